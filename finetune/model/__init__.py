"""GPT-J backbone and heads (no training code here)."""
from finetune.model.chunked_loss import LMHead, default_chunk_tokens
from finetune.model.gptj import PRESETS, GPTJConfig, GPTJModel, KVCache, ModelConfigError, PackedSequences
from finetune.model.heads import (
    ARCHITECTURES,
    HEADS,
    CausalLMOutput,
    GPTJForCausalLM,
    GPTJForQuestionAnswering,
    GPTJForSequenceClassification,
    GPTJPreTrainedModel,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    build_model,
)

__all__ = [
    "PRESETS", "GPTJConfig", "GPTJModel", "KVCache", "ModelConfigError", "ARCHITECTURES", "HEADS",
    "CausalLMOutput", "GPTJForCausalLM", "GPTJForQuestionAnswering", "GPTJForSequenceClassification",
    "GPTJPreTrainedModel", "QuestionAnsweringOutput", "SequenceClassifierOutput", "build_model", "LMHead",
    "default_chunk_tokens", "PackedSequences",
]
