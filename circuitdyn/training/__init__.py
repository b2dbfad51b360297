"""Making runs: continual pre-training (`cpt`), sweeps over seeds and strategies (`sweep`), the transformers Trainer
callback (`trainer`)."""
