"""BERT with product-key memory layers, as Hugging Face ``PreTrainedModel`` classes.

Everything but the memory reuses transformers' BERT modules (embeddings, attention, FFN, pooler,
MLM head), so checkpoint keys are plain BERT's and a BERT checkpoint loads weight by weight.
A memory layer ``i`` adds ``encoder.layer.{i}.memory.*`` (query net, keys, BatchNorm buffers and
the value table ``memory.values.weight``); in replace mode it has no FFN (no ``intermediate.*``,
no ``output.dense.*``).

Every BERT head: ``BertPkmModel``, ``...ForMaskedLM``, ``...ForPreTraining`` (MLM + NSP),
``...ForNextSentencePrediction``, ``...ForSequenceClassification``, ``...ForTokenClassification``,
``...ForQuestionAnswering``, ``...ForMultipleChoice``, each with transformers' BERT head modules and
names (registered with their Auto classes by ``pkm.hf_auto``). ``save_pretrained`` also writes the
folder's remote code (``pkm.remote_code``).

Post-LN block, FFN sublayer (DESIGN.md "Placement"):
    plain:    h' = LN(h + Dropout(FFN(h)))
    replace:  h' = LN(h + Dropout(PKM(h)))
    residual: h' = LN(h + Dropout(FFN(h) + PKM(h)))     (ResM, Kim & Jung 2020)

Memory outputs (for usage metrics, no second forward, no host sync):
    * every model output has ``memory_outputs``: a tuple of ``MemoryOutput`` (one per memory layer,
      in ``config.memory_layers`` order) as the memory returned them, graph attached;
    * the base model also keeps the last forward's ones, detached, in ``last_memory_outputs``
      (``MemoryOutput`` with ``output=None``; ``indices``/``weights`` [T, heads, knn] for the T
      non-padded tokens), reachable through ``last_memory_outputs(model)`` even from a wrapper
      (DeepSpeed engine, DDP). They are replaced on the next forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertForPreTrainingOutput,
    BertIntermediate,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOnlyNSPHead,
    BertOutput,
    BertPooler,
    BertPreTrainingHeads,
    BertSelfAttention,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from pkm.configuration import BertPkmConfig
from pkm.memory import MemoryOutput, ProductKeyMemory
from pkm.values import ValueTable

__all__ = [
    "BertPkmConfig",
    "BertPkmModel",
    "BertPkmForMaskedLM",
    "BertPkmForSequenceClassification",
    "BertPkmForQuestionAnswering",
    "BertPkmForTokenClassification",
    "BertPkmForMultipleChoice",
    "BertPkmForNextSentencePrediction",
    "BertPkmForPreTraining",
    "BertPkmPreTrainedModel",
    "memory_modules",
    "value_tables",
    "last_memory_outputs",
    "parameter_groups",
]


# --------------------------------------------------------------------------------------------------
# Output types: the HF ones plus the memory outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class BertPkmModelOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmMaskedLMOutput(MaskedLMOutput):
    """``logits`` is [B, S, vocab] in general, but [M, vocab] when only masked positions were
    scored (training with labels): row i belongs to the i-th position with ``labels != -100`` in
    row-major (batch, position) order, i.e. it matches ``labels[labels != -100]``."""

    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmSequenceClassifierOutput(SequenceClassifierOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmTokenClassifierOutput(TokenClassifierOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmMultipleChoiceOutput(MultipleChoiceModelOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmNextSentencePredictorOutput(NextSentencePredictorOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


@dataclass
class BertPkmForPreTrainingOutput(BertForPreTrainingOutput):
    memory_outputs: tuple[MemoryOutput, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _build_memory(config: BertPkmConfig, external_values: bool) -> ProductKeyMemory:
    return ProductKeyMemory.from_config(config.hidden_size, config.hidden_size, config.memory, external_values)


class BertPkmReplaceOutput(nn.Module):
    """Replace mode's sublayer closing: LN(h + Dropout(PKM(h))). Named ``output`` in the layer with
    BERT's ``LayerNorm`` so the checkpoint's ``output.LayerNorm`` loads into it."""

    def __init__(self, config: BertPkmConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, memory_output: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(memory_output) + input_tensor)


class BertPkmResidualOutput(BertOutput):
    """Residual mode: LN(h + Dropout(W2 a + b2 + PKM(h))); same parameters as ``BertOutput``."""

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, memory_output: torch.Tensor
    ) -> torch.Tensor:
        hidden_states = self.dense(hidden_states) + memory_output  # [B, S, d]
        hidden_states = self.dropout(hidden_states)
        return self.LayerNorm(hidden_states + input_tensor)


class BertPkmLayer(GradientCheckpointingLayer):
    """One encoder layer: self-attention, then FFN, memory, or both (see the module docstring)."""

    def __init__(self, config: BertPkmConfig, layer_idx: int, external_values: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = BertAttention(config, is_causal=False, layer_idx=layer_idx)
        self.has_memory = layer_idx in config.memory_layers
        self.memory_mode = config.memory_mode if self.has_memory else None
        if not self.has_memory:
            self.intermediate = BertIntermediate(config)
            self.output = BertOutput(config)
        elif self.memory_mode == "replace":
            self.memory = _build_memory(config, external_values)
            self.output = BertPkmReplaceOutput(config)
        else:
            self.intermediate = BertIntermediate(config)
            self.memory = _build_memory(config, external_values)
            self.output = BertPkmResidualOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, MemoryOutput | None]:
        """hidden_states [B, S, d]; attention_mask: the attention implementation's mask;
        memory_mask [B, S] (1 real, 0 pad), or [T] flat indices of the real tokens (the memory's
        token_positions: no host sync), or None -> ([B, S, d], MemoryOutput or None)."""
        h, _ = self.attention(hidden_states, attention_mask, **kwargs)  # [B, S, d]
        if not self.has_memory:
            return self.output(self.intermediate(h), h), None
        if memory_mask is not None and memory_mask.dim() == 1:
            mem = self.memory(h, token_positions=memory_mask)
        else:
            mem = self.memory(h, memory_mask)  # output [B, S, d], zero at padded positions
        if self.memory_mode == "replace":
            return self.output(mem.output, h), mem
        return self.output(self.intermediate(h), h, mem.output), mem


class BertPkmEncoder(nn.Module):
    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(
            [BertPkmLayer(config, i, external_values) for i in range(config.num_hidden_layers)]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[MemoryOutput, ...]]:
        memory_outputs = []
        for layer in self.layer:
            # hidden_states positional: required for reentrant gradient checkpointing
            hidden_states, mem = layer(hidden_states, attention_mask, memory_mask, **kwargs)
            if mem is not None:
                memory_outputs.append(mem)
        return hidden_states, tuple(memory_outputs)


# --------------------------------------------------------------------------------------------------
# Pretrained-model plumbing
# --------------------------------------------------------------------------------------------------


class BertPkmPreTrainedModel(PreTrainedModel):
    config: BertPkmConfig
    config_class = BertPkmConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": BertPkmLayer, "attentions": BertSelfAttention}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """HF from_pretrained, then value tables set back to requires_grad=False: transformers 5
        re-wraps every loaded floating tensor as ``nn.Parameter(requires_grad=True)``, which would
        hand the tables to the dense optimizer / DeepSpeed."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for memory in memory_modules(model):
            if memory.owns_values:
                memory.value_table.weight.requires_grad_(False)
        return loaded

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """HF save_pretrained, plus the folder's remote code (``pkm.remote_code``): config.json gets
        an ``auto_map`` and ``configuration_bert_pkm.py`` / ``modeling_bert_pkm.py`` (this package's
        pure-torch path, generated from its source) are written beside the weights, so
        ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` works without this package."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload the folder before its remote code "
                             "is written: save it first, then upload it (huggingface_hub.upload_folder).")
        result = super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            from pkm.remote_code import write_remote_code  # the generator reads source files: on use only

            write_remote_code(save_directory)
        return result

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init plus the memory's. Only ``transformers.initialization`` functions are used:
        they skip tensors flagged as loaded, so from_pretrained never overwrites loaded keys, value
        tables or BatchNorm running statistics; only missing ones are initialised."""
        super()._init_weights(module)  # Linear/Embedding N(0, std), norms (incl. BatchNorm stats)
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(
                module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1))
            )
            init.zeros_(module.token_type_ids)
        elif isinstance(module, ProductKeyMemory):
            bound = (module.k_dim // 2) ** -0.5  # Lample: U(+-1/sqrt(k_dim/2)), as reset_keys
            init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, ValueTable):
            if module.init == "zeros":
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=module.dim**-0.5)


class BertPkmModel(BertPkmPreTrainedModel):
    """``external_values=True`` (every BertPkm model class takes it): the memories get no value
    tables of their own; they are handed in afterwards (``attach_values``; for sharded tables
    ``pkm.sharded_values.attach_sharded_values``), so no process ever holds a full table it does
    not need. The state_dict then has no ``memory.values.weight``."""

    _no_split_modules = ["BertEmbeddings", "BertPkmLayer"]

    def __init__(self, config: BertPkmConfig, add_pooling_layer: bool = True, external_values: bool = False) -> None:
        super().__init__(config)
        config.validate_memory()  # the config may have been edited after construction
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertPkmEncoder(config, external_values)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.last_memory_outputs: list[MemoryOutput] = []
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmModelOutput:
        """attention_mask [B, S] (1 real, 0 pad): used by attention and, as is, by the memories so
        padded tokens stay out of BatchNorm statistics. token_positions [T] (optional): the flat
        indices of the real tokens (``pretrain.data.add_positions``); the memories then take them
        instead of the mask, which avoids a host sync per memory layer on a GPU."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        kwargs.pop("use_cache", None)  # encoder only: there is no cache
        embedding_output = self.embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        )  # [B, S, d]
        # The memories take the [B, S] padding mask as is; a caller-made 4D attention mask carries
        # no per-token padding, so the memories then treat every position as real.
        is_2d = attention_mask is not None and attention_mask.dim() == 2
        memory_mask = token_positions if token_positions is not None else (attention_mask if is_2d else None)
        attn_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
        )
        sequence_output, memory_outputs = self.encoder(
            embedding_output, attn_mask, memory_mask, position_ids=position_ids, **kwargs
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        # Detached copies for metrics; no .item()/sync, dropped on the next forward.
        self.last_memory_outputs = [
            MemoryOutput(output=None, indices=m.indices, weights=m.weights.detach())  # type: ignore[arg-type]
            for m in memory_outputs
        ]
        return BertPkmModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            memory_outputs=memory_outputs,
        )


def _classification_loss(config: BertPkmConfig, num_labels: int, logits, labels) -> torch.Tensor:
    """HF BertForSequenceClassification's loss: num_labels == 1 -> MSE regression."""
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return MSELoss()(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return MSELoss()(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels.to(logits.dtype))


class BertPkmForMaskedLM(BertPkmPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.bert = BertPkmModel(config, add_pooling_layer=False, external_values=external_values)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masked_logits_only: bool | None = None,
        masked_positions: torch.Tensor | None = None,
        token_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmMaskedLMOutput:
        """labels [B, S], -100 = not predicted. ``masked_logits_only`` (default: training and labels
        given) projects to the vocabulary only where labels != -100: logits are then [M, vocab]
        (see BertPkmMaskedLMOutput), otherwise [B, S, vocab]. The loss is the same either way.
        ``masked_positions`` [M] / ``token_positions`` [T] (optional, from
        ``pretrain.data.add_positions``): flat indices of the labelled positions / real tokens, used
        instead of boolean masks so that a GPU step needs no host sync; same results."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_positions=token_positions,
            return_dict=True,
            **kwargs,
        )
        sequence_output = outputs.last_hidden_state  # [B, S, d]
        if masked_logits_only is None:
            masked_logits_only = self.training and labels is not None
        if masked_logits_only and labels is None:
            raise ValueError("masked_logits_only=True needs labels: they say which positions to score.")

        loss = None
        if masked_logits_only and masked_positions is not None:
            # rows of the labelled positions by an index of known length: no host sync
            flat = sequence_output.reshape(-1, sequence_output.shape[-1])  # [B*S, d]
            logits = self.cls(flat.index_select(0, masked_positions))  # [M, vocab]
            loss = CrossEntropyLoss()(logits, labels.reshape(-1).index_select(0, masked_positions))
        elif masked_logits_only:
            selected = labels != -100  # [B, S]
            logits = self.cls(sequence_output[selected])  # [M, vocab]; boolean index syncs once
            loss = CrossEntropyLoss()(logits, labels[selected])
        else:
            logits = self.cls(sequence_output)  # [B, S, vocab]
            if labels is not None:
                loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
        return BertPkmMaskedLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForSequenceClassification(BertPkmPreTrainedModel):
    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertPkmModel(config, external_values=external_values)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmSequenceClassifierOutput:
        """logits [B, num_labels]; labels [B] (class ids, or floats for num_labels == 1)."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = _classification_loss(self.config, self.num_labels, logits, labels)
        return BertPkmSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForQuestionAnswering(BertPkmPreTrainedModel):
    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertPkmModel(config, add_pooling_layer=False, external_values=external_values)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmQuestionAnsweringOutput:
        """start_logits / end_logits [B, S]; positions [B] (out-of-range ones are ignored)."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # [B, S, 2]
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()  # [B, S]
        end_logits = end_logits.squeeze(-1).contiguous()  # [B, S]
        total_loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            ignored_index = start_logits.size(1)  # positions outside the window are ignored
            start_positions = start_positions.clamp(0, ignored_index)
            end_positions = end_positions.clamp(0, ignored_index)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            start_loss = loss_fct(start_logits, start_positions)
            total_loss = (start_loss + loss_fct(end_logits, end_positions)) / 2
        return BertPkmQuestionAnsweringOutput(
            loss=total_loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForTokenClassification(BertPkmPreTrainedModel):
    """Per-token labels (NER, POS): transformers' BertForTokenClassification on the memory model."""

    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertPkmModel(config, add_pooling_layer=False, external_values=external_values)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmTokenClassifierOutput:
        """logits [B, S, num_labels]; labels [B, S] (-100 = not scored, e.g. padding, sub-words)."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # [B, S, num_labels]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        return BertPkmTokenClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForMultipleChoice(BertPkmPreTrainedModel):
    """SWAG-style choice among C candidates: inputs [B, C, S] are scored as B*C sequences."""

    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.bert = BertPkmModel(config, external_values=external_values)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmMultipleChoiceOutput:
        """input_ids / masks [B, C, S] (inputs_embeds [B, C, S, d]) -> logits [B, C]; labels [B]."""
        num_choices = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:  # [B, C, S] -> [B*C, S]
            return None if t is None else t.reshape(-1, t.shape[-1])

        embeds = None if inputs_embeds is None else inputs_embeds.reshape(-1, *inputs_embeds.shape[-2:])
        outputs = self.bert(
            flat(input_ids),
            attention_mask=flat(attention_mask),
            token_type_ids=flat(token_type_ids),
            position_ids=flat(position_ids),
            inputs_embeds=embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)  # [B, C]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits, labels)
        return BertPkmMultipleChoiceOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForNextSentencePrediction(BertPkmPreTrainedModel):
    """BERT's next-sentence head (``cls.seq_relationship`` on the pooler): logits [B, 2], label 0 =
    sentence B follows A, 1 = random."""

    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.bert = BertPkmModel(config, external_values=external_values)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmNextSentencePredictorOutput:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self.cls(outputs.pooler_output)  # [B, 2]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, 2), labels.view(-1))
        return BertPkmNextSentencePredictorOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


class BertPkmForPreTraining(BertPkmPreTrainedModel):
    """BERT's pretraining heads, MLM + NSP (``cls.predictions``, ``cls.seq_relationship``), with
    BertForPreTraining's names, so a BERT pretraining checkpoint loads both heads and the pooler.
    The MLM logits are always [B, S, vocab] (no masked-only scoring, unlike BertPkmForMaskedLM)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertPkmConfig, external_values: bool = False) -> None:
        super().__init__(config)
        self.bert = BertPkmModel(config, external_values=external_values)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        **kwargs,
    ) -> BertPkmForPreTrainingOutput:
        """prediction_logits [B, S, vocab], seq_relationship_logits [B, 2]; the loss (MLM + NSP, as
        BertForPreTraining) needs both labels [B, S] and next_sentence_label [B]."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        prediction_logits, nsp_logits = self.cls(outputs.last_hidden_state, outputs.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            mlm_loss = CrossEntropyLoss()(prediction_logits.view(-1, self.config.vocab_size), labels.view(-1))
            loss = mlm_loss + CrossEntropyLoss()(nsp_logits.view(-1, 2), next_sentence_label.view(-1))
        return BertPkmForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            memory_outputs=outputs.memory_outputs,
        )


# --------------------------------------------------------------------------------------------------
# Helpers for the trainer
# --------------------------------------------------------------------------------------------------


def memory_modules(model: nn.Module) -> list[ProductKeyMemory]:
    """Every ProductKeyMemory in ``model`` (also through a DeepSpeed engine / DDP wrapper), in
    layer order."""
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


def value_tables(model: nn.Module) -> list[ValueTable]:
    """The value table each memory looks up (its own, or the attached/sharded one), layer order."""
    return [m.value_table for m in memory_modules(model)]


def last_memory_outputs(model: nn.Module) -> list[MemoryOutput]:
    """The last forward's detached memory outputs (indices/weights; ``output`` is None)."""
    for m in model.modules():
        if isinstance(m, BertPkmModel):
            return list(m.last_memory_outputs)
    raise ValueError(f"{type(model).__name__} contains no BertPkmModel.")


_NO_DECAY_MODULES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Dense optimizer groups; value tables are left out (they go to SparseAdam).

    * ``dense_decay``: weight matrices and embeddings, ``weight_decay``;
    * ``dense_no_decay``: biases and norm (LayerNorm/BatchNorm) parameters, 0.0;
    * ``memory_dense``: every trainable memory parameter but the values (query net, its norm,
      the product keys), 0.0: decaying keys shrinks their scores and flattens the softmax.
    Frozen parameters (requires_grad=False) are left out; empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    # own tables are submodules; attached ones are not parameters of the model at all
    table_ids = {id(m.value_table.weight) for m in memory_modules(model) if m.owns_values}
    memory_ids = {id(p) for m in memory_modules(model) for p in m.parameters()} - table_ids
    no_decay_ids = {
        id(p)
        for mod in model.modules()
        if isinstance(mod, _NO_DECAY_MODULES)
        for p in mod.parameters(recurse=False)
    }
    names = ("dense_decay", "dense_no_decay", "memory_dense")
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in names}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad or id(p) in table_ids:
            continue
        if id(p) in memory_ids:
            groups["memory_dense"].append(p)
        elif id(p) in no_decay_ids or name.endswith("bias"):
            groups["dense_no_decay"].append(p)
        else:
            groups["dense_decay"].append(p)
    decay = {"dense_decay": weight_decay, "dense_no_decay": 0.0, "memory_dense": 0.0}
    return [
        {"params": params, "weight_decay": decay[name], "name": name}
        for name, params in groups.items()
        if params
    ]
