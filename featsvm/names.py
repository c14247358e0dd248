"""The names a user types: backbones, heads, end-to-end models, devices and precisions.

They live here, in a module that imports nothing, so that the command line can offer them
as choices (and `featsvm --help` can list its commands) without importing torch or
scikit-learn. The modules that implement them take their names from here, and a test checks
that the backbone registry matches.
"""

from __future__ import annotations

BACKBONES = ("vgg16", "inception_v3", "alexnet", "efficientnet_lite0")  # featsvm.features.backbones
# hand-crafted shortcut baselines, extracted / fitted like a backbone (featsvm.features.handcrafted)
BASELINES = ("colour_stats", "annotation_box")
FEATURES = (*BACKBONES, *BASELINES)  # everything `featsvm extract --backbone` accepts
HEADS = ("svm", "logreg")  # featsvm.models.heads
BASIC_CNN = "basic-cnn"  # featsvm.models.basic_cnn
MODELS = (BASIC_CNN, *BACKBONES)  # what `featsvm finetune` trains
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")  # what torch computes in (featsvm.device)
# what --precision offers: auto = bf16 where the CPU has it natively (featsvm.device);
# int8 = static post-training quantisation, with --engine onnxruntime | openvino only
PRECISION_CHOICES = ("auto", *PRECISIONS, "int8")
# what runs a backbone's forward pass: torch in this process, torch in a pool of Ray actors
# (featsvm.features.ray_extract: the same numbers), or the exported graph in ONNX Runtime /
# OpenVINO (featsvm.features.engines)
ENGINES = ("torch", "ray", "onnxruntime", "openvino")
VIEWS = ("field", "cells")  # featsvm.features.preprocess
STAINS = ("none", "reinhard")
COLOURS = ("rgb", "grey", "hematoxylin")
BACKENDS = ("local", "ray")  # where fit / cv run their joblib work (featsvm.cluster)
