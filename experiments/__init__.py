"""Studies built from the pipeline's stages: the demo (data prep -> pretraining -> conversion ->
finetuning -> report, on the embedded data) and Kim & Jung's ablation (a grid of pretraining runs,
each finetuned, in one report). They sit above ``pretrain`` and ``finetune``, which never import them."""
