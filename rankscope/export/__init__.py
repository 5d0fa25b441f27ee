"""Export weight updates as standard PEFT LoRA adapter folders (``rankscope export``).

Sources (``sources``): a full fine-tune, as a finished run folder or a base/fine-tuned pair
of model folders, whose ΔW is cut to its rank-k SVD; or a LoRA adapter (a PEFT folder, or a
LoRA run's ``adapter/``) whose s·B·A is resized to a lower rank by its exact SVD.
Ranks (``ranks``): one rank k for every module, the smallest k holding an energy share τ of
‖ΔW‖_F² per module, or the per-module ranks of a PEFT config such as ``rankscope
recommend``'s ``lora_config.json``.
Output (``adapters``): ``adapter_config.json`` and ``adapter_model.safetensors``, which
``PeftModel.from_pretrained`` loads, and ``export.json`` beside them: each module's rank and
the share of its update's energy that the rank keeps, the source, and provenance.
"""
