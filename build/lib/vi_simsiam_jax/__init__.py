"""VI-SimSiam in JAX/Flax: self-supervised learning as multimodal variational inference."""
