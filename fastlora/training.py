"""Hugging Face Trainer integration: checkpoints that hold the adapter alone.

``AdapterTrainer`` is a ``transformers.Trainer`` whose ``save_model`` and checkpoints write
the model's adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
kilobytes to megabytes) instead of the whole model (about 14 GB for a 7B model), next to the
Trainer's own optimizer, scheduler, RNG and trainer-state files, and whose
``train(resume_from_checkpoint=...)`` loads the adapter back from such a checkpoint: a
resumed run continues exactly where the interrupted one stopped. Import it from here
(``from fastlora.training import AdapterTrainer``): it needs transformers, which fastlora
itself does not.
"""

from __future__ import annotations

import os

import torch
import transformers

from fastlora.peft import load_adapter, save_adapter


class AdapterTrainer(transformers.Trainer):
    """A Trainer for a fastlora-injected model whose checkpoints hold only its adapter."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (PEFT's files), the tokenizer / processor and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load the adapter saved in ``resume_from_checkpoint`` into the model."""
        load_adapter(model if model is not None else self.model, resume_from_checkpoint)
