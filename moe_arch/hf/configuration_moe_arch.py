"""The Hugging Face config of an exported moe_arch model: the project's ModelConfig as a dict, plus the names
transformers' generation utilities read."""

from transformers import PretrainedConfig


class MoeArchConfig(PretrainedConfig):
    model_type = "moe_arch"

    def __init__(self, moe_arch: dict | None = None, **kwargs):
        self.moe_arch = dict(moe_arch or {})
        m = self.moe_arch
        kwargs.setdefault("vocab_size", m.get("vocab_size"))
        kwargs.setdefault("hidden_size", m.get("d_model"))
        kwargs.setdefault("num_hidden_layers", m.get("n_layers"))
        kwargs.setdefault("num_attention_heads", m.get("n_heads"))
        kwargs.setdefault("max_position_embeddings", m.get("max_seq_len"))
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", False)))
        super().__init__(**kwargs)
