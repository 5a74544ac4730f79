"""Evaluation of a pretrained encoder: restoring it frozen and extracting features (`encoder`),
the linear probe (`linear_probe`), kNN (`knn`), and what kappa captures (`uncertainty`,
`kappa_report`). Nothing here imports the training step or loop."""
