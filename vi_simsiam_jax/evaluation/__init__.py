"""Evaluation of a pretrained encoder: restoring it frozen and extracting features (`encoder`),
the linear probe (`linear_probe`), kNN (`knn`) and the kNN monitor of pretraining
(`knn_monitor`), and what kappa captures (`uncertainty`, `kappa_report`, `ood_report`,
`corruptions`). Every evaluator takes an `encoder.FrozenEncoder` and returns its results in
memory; nothing here imports the training step, the loop or matplotlib, or writes files."""
