"""The pretraining driver behind ``pretrain_gpt.py``: arguments, parallel setup, data,
one training step per platform (GPU: megatron-core's engine; CPU: its smallest
substitute), checkpoints, metrics and the train/eval loop."""
