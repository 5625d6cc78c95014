"""peft_tuner: parameter-efficient fine-tuning of causal LMs under DeepSpeed ZeRO, from one launcher."""
__version__ = "0.1.0"
