from moe_arch.model.transformer import HybridLM, LMOutput, build_model

__all__ = ["HybridLM", "LMOutput", "build_model"]
