"""What a step minimises: masked cross-entropy, preference and reward losses, MoE auxiliary loss."""
