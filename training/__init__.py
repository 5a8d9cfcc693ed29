"""Training (DeepSpeed pretraining, fine-tuning, exit-head training): arrives with the training issue."""
