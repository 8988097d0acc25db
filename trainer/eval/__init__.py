"""Evaluation of frozen vision models (any timm / open_clip model): kNN, linear probe, fidelity, zero-shot."""

from trainer.eval.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from trainer.eval.fashion_mnist import load_fashion_mnist, read_idx
from trainer.eval.features import Features, ForwardFeatures, extract_features
from trainer.eval.fidelity import model_fidelity, token_fidelity
from trainer.eval.knn import knn_accuracy, knn_predict
from trainer.eval.linear_probe import (
    LinearProbe,
    choose_weight_decay,
    fit_linear_probe,
    fold_accuracies,
    linear_probe_accuracy,
)
from trainer.eval.preprocess import image_batches
from trainer.eval.zero_shot import (
    DEFAULT_TEMPLATES,
    zero_shot_classifier,
    zero_shot_logits,
    zero_shot_predict,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "FASHION_MNIST_CLASSES",
    "Features",
    "ForwardFeatures",
    "LinearProbe",
    "choose_weight_decay",
    "extract_features",
    "fit_linear_probe",
    "fold_accuracies",
    "image_batches",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "load_fashion_mnist",
    "model_fidelity",
    "read_idx",
    "token_fidelity",
    "zero_shot_classifier",
    "zero_shot_logits",
    "zero_shot_predict",
]
