"""Parameter-efficient methods added to a model: LoRA, DoRA, AdaLoRA, prompt/prefix tuning."""
