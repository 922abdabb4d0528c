"""The one list of transformers Auto class -> BertPkm model class: ``pkm.hf_auto`` registers them,
``pkm.remote_code`` writes them into a saved folder's ``auto_map``. No imports: a leaf module."""

from __future__ import annotations

__all__ = ["AUTO_CLASSES"]

# transformers Auto class -> pkm.modeling class
AUTO_CLASSES: dict[str, str] = {
    "AutoModel": "BertPkmModel",
    "AutoModelForMaskedLM": "BertPkmForMaskedLM",
    "AutoModelForPreTraining": "BertPkmForPreTraining",
    "AutoModelForSequenceClassification": "BertPkmForSequenceClassification",
    "AutoModelForTokenClassification": "BertPkmForTokenClassification",
    "AutoModelForQuestionAnswering": "BertPkmForQuestionAnswering",
    "AutoModelForMultipleChoice": "BertPkmForMultipleChoice",
    "AutoModelForNextSentencePrediction": "BertPkmForNextSentencePrediction",
}
