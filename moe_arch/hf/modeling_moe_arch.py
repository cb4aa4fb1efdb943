"""The Hugging Face model class of an exported moe_arch model: a thin PreTrainedModel around the project's own
HybridLM (copied beside this file), next-token logits only (the multi-token heads are kept in the weights but
not used by ``forward``). Generation recomputes the prefix each step (no HF cache object for the hybrid
attention + Mamba state); ``moe-arch generate`` has the cached decoder."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .config import ModelConfig
from .configuration_moe_arch import MoeArchConfig
from .transformer import HybridLM


class MoeArchForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoeArchConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_cache_class = False

    def __init__(self, config: MoeArchConfig):
        super().__init__(config)
        self.model = HybridLM(ModelConfig(**config.moe_arch))
        self.post_init()

    def _init_weights(self, module):  # weights always come from the exported checkpoint
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        logits = self.model(input_ids, return_logits=True, mtp=False).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
