"""Training (needs the ``train`` extra): DeepSpeed pretraining from recipes (``pretrain``), HF Trainer fine-tuning
with optional DeepSpeed / LoRA (``finetune``), exit-head training on a frozen base (``exits``), the offline
``quickstart``, and the ``datasets`` / ``tokenizers`` data pipeline (``data``). Nothing is imported here: import the
submodules (``from moduleformer_exit.training.pretrain import train``)."""
