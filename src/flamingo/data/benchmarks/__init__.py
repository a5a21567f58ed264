"""The benchmarks' data, below evaluation and training alike: their samples (`samples`), the data
config naming their files (`data_config`), the loaders of each format (`loaders`), the reading of a
sample's image or video (`media`) and the task definitions with their prompt formats (`tasks`).
`flamingo.evaluation` measures models on them; `flamingo.training.finetune` trains on a
benchmark's train split in the same prompt format."""
