"""alssl: self-supervised pretraining + active learning + semi-supervised fine-tuning under a labeling budget."""

__version__ = "0.1.0"
