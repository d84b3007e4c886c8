"""From one trained model to another without starting over.

``upcycle``: a dense model's FFNs become MoE layers (sparse upcycling and Drop-Upcycling).
``lora``: low-rank adapters with Hugging Face ``peft`` (target resolution, adapter folders,
merge). ``finetune``: the LoRA training entry point over ``moelab.train.trainer.train``.
``arms``: upcycled arms of ``moelab compare --from RUN``.
"""
