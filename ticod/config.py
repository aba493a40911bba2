"""Typed configuration tree: the only place where defaults live.

A run's config is ``OmegaConf.merge(structured(Config), *yaml_files, dotlist(overrides))``.
YAML files in ``configs/`` hold overrides only. Unknown keys, wrong types and impossible
combinations fail at start with a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


class Task(str, enum.Enum):
    joint = "joint"
    detection = "detection"
    caption = "caption"


class Balance(str, enum.Enum):
    fixed = "fixed"
    uncertainty = "uncertainty"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class RoINorm(str, enum.Enum):
    syncbn = "syncbn"
    gn = "gn"
    none = "none"


class BoxLoss(str, enum.Enum):
    smooth_l1 = "smooth_l1"
    giou = "giou"


class LrScaling(str, enum.Enum):
    none = "none"
    linear = "linear"
    sqrt = "sqrt"


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One shard set of a training mix (``data.sources``)."""

    name: str = ""  # in logs and eval keys (samples/<name>, eval/<name>/AP); default: the dir's name
    shards_dir: str = ""
    # Share of the training samples drawn from this source (weights are normalised over the sources).
    weight: float = 1.0
    train_split: str = "train"
    val_split: str = "val"  # "" : this source is not evaluated


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches."""

    # Directory written by tools/shard_coco.py: {split}-000000.tar ... and {split}-manifest.json.
    shards_dir: str = "data/shards"
    train_split: str = "train"
    val_split: str = "val"
    # Tokenizer: a HF hub name ("gpt2"), a local dir with tokenizer files, or "" to use the
    # byte-level BPE that tools/shard_coco.py --train-tokenizer saved in shards_dir/tokenizer.
    tokenizer: str = "gpt2"
    batch_size: int = 2  # per rank, per micro-step
    eval_batch_size: int = 2
    num_workers: int = 2
    # Batches each loader worker prepares ahead; raise it (or num_workers) when train/data_wait_frac is high.
    prefetch_factor: int = 4
    # Resize keeping aspect: shorter side to one of train_min_sizes (random: scale jitter), longer
    # side capped at max_size. Eval uses test_min_size.
    train_min_sizes: list[int] = field(default_factory=lambda: [800])
    test_min_size: int = 800
    max_size: int = 1333
    hflip_prob: float = 0.5
    # Batch training images of similar aspect ratio (landscape/portrait, split further between 4:3, 3:2 and
    # wider), with one train_min_sizes draw per batch, so a batch is padded little (tools/bench/padding.py:
    # padded/real pixels ~1.03 instead of ~1.3-1.8 on COCO). Off: the batch takes the shuffled order as is.
    group_by_aspect: bool = True
    shuffle_buffer: int = 1000
    max_caption_tokens: int = 32  # including BOS/EOS
    # Training captions per image and step (self-critical.pytorch's seq_per_img): the decoder reads each
    # image's features once per caption, k captions drawn without replacement from the image's references
    # (with replacement where it has fewer). The backbone and detector cost the same; the decoder sees k
    # times the caption tokens per step. Evaluation reads one (the first).
    captions_per_image: int = 1
    # Image normalisation (ImageNet stats, as the timm Swin weights expect).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # A training mix (README "Mixing datasets"): when set, these shard sets replace shards_dir/train_split/
    # val_split, each drawn in proportion to its weight; each source's val split is evaluated on its own.
    # Samples carry which labels they have (boxes, captions): each loss is taken over the samples that
    # have its labels. The tokenizer is still read from shards_dir when data.tokenizer is "".
    sources: list[SourceConfig] = field(default_factory=list)
    # The detection sources' categories merge into one label space by name, in source order; this YAML or
    # JSON file renames the categories of a source where its names differ: {source name: {its name: name}}.
    category_map: str = ""


# -------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    """timm Swin Transformer used through ``features_only``."""

    name: str = "swin_base_patch4_window7_224"  # timm variant name (the one string lookup)
    pretrained: bool = False  # timm hub weights for `name`
    checkpoint_path: str = ""  # local weights file (.safetensors / .pth / .bin); wins over hub
    grad_checkpointing: bool = False
    drop_path_rate: float = 0.2
    # Extra keyword arguments for timm.create_model (tiny CPU variants set embed_dim/depths/...).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RPNConfig:
    """torchvision RegionProposalNetwork settings."""

    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


ROI_HEADS = ("shared2fc", "4conv1fc")  # model.roi.head


@dataclass
class RoIConfig:
    """Cascade R-CNN head: one entry per stage in the per-stage lists."""

    iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    stage_loss_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    # Box-coder target stds per stage (x, y, w, h); BoxCoder weights are their reciprocals.
    bbox_stds: list[list[float]] = field(
        default_factory=lambda: [
            [0.1, 0.1, 0.2, 0.2],
            [0.05, 0.05, 0.1, 0.1],
            [0.033, 0.033, 0.067, 0.067],
        ]
    )
    # Box head of each stage: "shared2fc" (two FC layers, torchvision's TwoMLPHead) or "4conv1fc" (four
    # 3x3 convs as wide as the FPN, each with `norm` and ReLU, then one FC; mmdetection's
    # Shared4Conv1FCBBoxHead, as in the Swin Cascade R-CNN configs). Both end in `representation_size`.
    head: str = "shared2fc"
    # Norm of the 4conv1fc convs. syncbn: BatchNorm whose batch statistics are synchronised over all
    # processes where torch can (accelerator tensors, NCCL) and per process on CPU; gn: GroupNorm with 32
    # groups; none: conv bias only. syncbn and gn keep the same parameters wherever the model runs.
    norm: RoINorm = RoINorm.syncbn
    class_agnostic_bbox: bool = True  # one box per RoI; false: one per class, of 4 * (K + 1) deltas
    # Stage box loss: smooth_l1 on the encoded deltas (torchvision), or giou on the decoded boxes
    # (mmdetection's GIoULoss with reg_decoded_bbox). Either is summed over the positives and divided by
    # the sampled RoIs, then multiplied by box_loss_weight.
    box_loss: BoxLoss = BoxLoss.smooth_l1
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0 / 9.0  # torchvision's Fast R-CNN value
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    roi_output_size: int = 7
    # RoIAlign (always aligned=True) sampling points per bin and axis; 0: adaptive, ceil(RoI size /
    # roi_output_size) per RoI and axis (the reference).
    sampling_ratio: int = 0
    representation_size: int = 1024
    # Recompute each stage's RoIAlign + box head in backward instead of keeping its RoI features
    # (batch_size_per_image x C x 7 x 7 per image and stage: the largest activations outside the backbone).
    grad_checkpointing: bool = False
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class CaptionerConfig:
    """GPT-2 decoder with cross-attention to visual tokens."""

    # HF hub name ("gpt2") or local dir; used when pretrained is true.
    name: str = "gpt2"
    pretrained: bool = False
    # Sizes used when not pretrained (random init, e.g. tiny CPU models).
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 64
    grad_checkpointing: bool = False
    # Visual memory: the last backbone stage flattened; optionally add FPN levels too.
    use_fpn_levels: bool = False
    fpn_levels: list[str] = field(default_factory=lambda: ["2"])
    # Object tokens: the decoder also reads one token for each of up to this many objects an image (0: off):
    # the largest ground-truth boxes (with their true classes) in training, the detections scoring >=
    # object_min_score in eval. A token says what the detector knows of the box (last-stage box-head feature,
    # stage-averaged class probabilities), what it looks like (a 3x3 RGB thumbnail) and where it is. Read
    # without gradient: the caption loss does not train the detector through them. Off without the detector
    # (loss.task=caption).
    object_tokens: int = 0
    object_min_score: float = 0.3
    # Eval objects are distinct like ground-truth ones: of detections overlapping by IoU > object_nms_iou (any
    # class: one object detected as two classes), only the most confident is read. 1.0 keeps them all.
    object_nms_iou: float = 0.5
    max_new_tokens: int = 30
    num_beams: int = 1  # 1 = greedy
    # Beam search ranks a caption by its summed log-probability / length ** length_penalty (transformers'
    # rule): < 1 favours shorter captions, > 1 longer ones.
    length_penalty: float = 1.0
    dropout: float = 0.1
    # Label smoothing of the caption cross-entropy (0: none; 0.1 is common for captioning transformers).
    label_smoothing: float = 0.0


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    num_classes: int = 80  # foreground classes K; labels are 1..K (0 is background)
    # Fine-tune: start from a trained TICOD's weights (export dir, run dir or checkpoint dir) with a fresh
    # optimizer and schedule; another label set keeps the rows of the classes both have (ticod/init_from.py).
    init_from: str = ""


# ------------------------------------------------------------------------------------ training
@dataclass
class LossConfig:
    task: Task = Task.joint
    # λ in L = L_det + λ·L_cap (paper: 0.1 small, 0.2 large). Used when balance is fixed.
    caption_weight: float = 0.2
    balance: Balance = Balance.fixed


@dataclass
class OptimConfig:
    lr: float = 1e-4  # heads (FPN, RPN, RoI, and the captioner unless caption_lr is set)
    backbone_lr: float = 1e-5
    # The caption decoder (GPT-2, its cross-attention, the visual memory) in groups of its own at this lr;
    # None: it trains at lr with the other heads.
    caption_lr: float | None = None
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Warmup: at most one of warmup_steps and warmup_samples (neither: no warmup). Samples (all ranks) keep
    # the warmup the same at every world size; steps do not. Set one, the other is unset (as the budget).
    warmup_steps: int | None = 500
    warmup_samples: int | None = None
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio at the end of the budget
    # Peak lr = lr (and backbone_lr) x scale, for the global batch B = data.batch_size x grad_accum x world
    # size: scale 1 (none), B / reference_batch (linear) or sqrt(B / reference_batch) (sqrt; Adam's rule).
    lr_scaling: LrScaling = LrScaling.none
    reference_batch: int = 0  # the global batch lr and backbone_lr were tuned for (needed for a scaling)
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Precision = Precision.bf16  # bf16 (torch autocast, fp32 weights) or fp32; fp16 is refused
    offload_optimizer: bool = False  # ZeRO-Offload to CPU (stage >= 1)
    overlap_comm: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    dist_timeout_s: int = 1800  # a rank that stops responding fails the job after this


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "ticod"
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    save_every: int = 1000  # steps; 0 = only at the end
    keep_last: int = 3
    resume: str = ""  # "", "auto" (latest complete checkpoint in run_dir) or a checkpoint dir
    # The loop waits only while the state is copied to host memory; the files are written in the background
    # and published when every rank's write is done (docs/reliability.md). false: the loop waits for the write.
    async_save: bool = True


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = only when asked (python -m ticod.evaluate) or at the end
    # Ground truth for COCOeval / caption references: the original COCO JSON files when given,
    # else rebuilt from the val shards (which carry every box, crowd flag, area and caption).
    instances_json: str = ""
    captions_json: str = ""
    at_start: bool = False  # evaluate the untrained model first (a baseline for the final numbers)
    at_end: bool = True
    max_images: int = 0  # 0 = the whole val split
    score_threshold: float = 0.0
    # Sample predictions (boxes drawn, predicted and reference captions) of this many images: EVAL_DIR/samples.md
    # with the images beside it, the wandb table eval/samples and wandb media eval/predictions.
    num_sample_images: int = 4
    # BERTScore: HF model name or local dir; num_layers = 0 means bert-score's default for the model.
    bertscore_model: str = "roberta-large"
    bertscore_num_layers: int = 0
    bertscore_rescale_with_baseline: bool = False
    bertscore: bool = True


@dataclass
class FaultConfig:
    """Fault injection for reliability tests and drills; all off by default. A fault "after step N" comes
    once the checkpoint saved at step N, if any, is complete (also with checkpoint.async_save)."""

    # Make the loss NaN at these micro-batches (1-based count of batches drawn on each rank; with
    # grad_accum=1 and no skips, the optimizer step of the same number).
    nan_loss_at_steps: list[int] = field(default_factory=list)
    kill_at_step: int = 0  # after this optimizer step, `kill_rank` SIGKILLs itself (0 = never)
    kill_rank: int = 0
    hang_at_step: int = 0  # after this step, `hang_rank` stops responding (sleeps)
    # Default kill_rank. Another rank than kill_rank stands for a rank stuck in a collective that never
    # notices the failed rank (as on NCCL): only the launcher can end it.
    hang_rank: int | None = None
    raise_at_step: int = 0  # after this step, `kill_rank` raises an exception (the process exits 1)
    # `kill_rank` SIGKILLs itself in the background write of this step's checkpoint, after its first file
    # (checkpoint.async_save; 0 = never).
    kill_in_write_at_step: int = 0


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    # The training budget: exactly one of max_steps, train_samples and train_epochs. A YAML file (one only)
    # or an override that sets one of them unsets the others set before it (`max_steps=100` on top of a
    # config in epochs means 100 steps). Steps are optimizer steps of the global batch (data.batch_size x
    # optim.grad_accum x world size), so what they train on changes with the GPU count; samples (images, all
    # ranks) and epochs (passes over the train manifest's total_samples) do not: ticod/budget.py converts
    # them to steps at start.
    max_steps: int | None = 90_000
    train_samples: int | None = None
    train_epochs: float | None = None
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    max_bad_fraction: float = 0.01  # bad samples / samples read before the run stops
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


# ------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated config from the schema, an optional YAML file and ``key=value`` overrides.

    YAML files may name a base with a top-level ``defaults: [other.yaml]`` list (paths relative
    to the file), applied before the file itself. ``path`` may also name a shipped config (:func:`find_config`).
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = _yaml_layers(find_config(path)) if path else []
        # One layer per override: of a ONE_OF group the key given last wins, as for one key given twice.
        items = _empty_strings(schema, list(overrides or []))
        layers += [_one_of(OmegaConf.from_dotlist([item]), "the overrides") for item in items]
        merged = OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    validate(merged)
    return merged  # type: ignore[return-value]


# The repository's configs/, shipped inside the package (ticod/configs is a link to it).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config(path: str | Path) -> Path:
    """A YAML file, else the shipped config of that name: ``ticod_large`` or ``ablation/joint(.yaml)``."""
    given = Path(path)
    shipped = SHIPPED_CONFIGS / (given if given.suffix == ".yaml" else given.with_name(given.name + ".yaml"))
    if given.is_file() or given.is_absolute() or not shipped.is_file():
        return given  # a missing file fails in _yaml_layers, naming it
    return shipped


def _empty_strings(schema: DictConfig, overrides: list[str]) -> list[str]:
    """Read ``key=`` as the empty string where the key is a string (omegaconf reads it as null).

    ``data.tokenizer=`` is how a shell user says "no tokenizer name"; without this it fails with
    "Incompatible value 'None' for field of type 'str'".
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and value == "" and isinstance(OmegaConf.select(schema, key, default=None), str):
            item = f"{key}=''"
        out.append(item)
    return out


def _yaml_layers(path: Path) -> list[DictConfig]:
    if not path.is_file():
        names = sorted(
            str(f.relative_to(SHIPPED_CONFIGS).with_suffix("")) for f in SHIPPED_CONFIGS.rglob("*.yaml")
        )
        raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(names)})")
    node = OmegaConf.load(path)  # yaml.safe_load underneath
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop("defaults", None) or []
    layers: list[DictConfig] = []
    for base in bases:
        layers += _yaml_layers(path.parent / str(base))
    return [*layers, _one_of(node, str(path))]


# Groups of keys of which a config sets one (the budget) or at most one (the warmup).
ONE_OF = (("max_steps", "train_samples", "train_epochs"), ("optim.warmup_steps", "optim.warmup_samples"))
_UNSET = object()


def _one_of(layer: DictConfig, where: str) -> DictConfig:
    """Where ``layer`` sets a key of a :data:`ONE_OF` group, unset the group's other keys."""
    for group in ONE_OF:
        given = [k for k in group if OmegaConf.select(layer, k, default=_UNSET) is not _UNSET]
        both = [k for k in given if OmegaConf.select(layer, k) is not None]
        if len(both) > 1:
            raise ConfigError(
                f"config key '{both[1]}': {where} also set '{both[0]}'; set one of {', '.join(group)}"
            )
        for key in group if given else ():
            if key not in given:
                OmegaConf.update(layer, key, None, force_add=True)
    return layer


def _get(cfg: Config | DictConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def validate(cfg: Config | DictConfig) -> None:
    """Reject combinations that cannot run, naming the key."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"config key '{key}': {why}")

    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        fail("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
    if cfg.deepspeed.precision == Precision.fp16:
        # DeepSpeed's fp16 mode casts the module to half (anchors, box coding and RoIs in fp16; roi_align
        # fails on fp16 maps with fp32 RoIs); its torch_autocast fp16 clips the loss-scaled gradients
        # under ZeRO. Neither trains this model correctly, so it is refused rather than advertised.
        fail(
            "deepspeed.precision",
            "fp16 is not supported: use bf16 (Ampere/Hopper and newer GPUs) or fp32 (V100 and older)",
        )
    budget_keys, warmup_keys = ONE_OF
    budget = [k for k in budget_keys if _get(cfg, k) is not None]
    if len(budget) != 1:
        fail(budget[1] if budget else "max_steps", f"set exactly one of {', '.join(budget_keys)}")
    warmup = [k for k in warmup_keys if _get(cfg, k) is not None]
    if len(warmup) > 1:
        fail(warmup[1], f"set at most one of {', '.join(warmup_keys)}")
    for key in ("max_steps", "train_samples", *warmup_keys):
        low = 0 if key in warmup_keys else 1
        if _get(cfg, key) is not None and _get(cfg, key) < low:
            fail(key, f"must be >= {low}")
    if cfg.train_epochs is not None and not cfg.train_epochs > 0:
        fail("train_epochs", "must be > 0")
    if cfg.max_steps is not None and (cfg.optim.warmup_steps or 0) > cfg.max_steps:
        fail("optim.warmup_steps", f"{cfg.optim.warmup_steps} exceeds max_steps={cfg.max_steps}")
    if cfg.train_samples is not None and (cfg.optim.warmup_samples or 0) > cfg.train_samples:
        fail("optim.warmup_samples", f"{cfg.optim.warmup_samples} exceeds train_samples={cfg.train_samples}")
    if cfg.optim.lr_scaling != LrScaling.none and cfg.optim.reference_batch < 1:
        fail("optim.reference_batch", f"optim.lr_scaling={cfg.optim.lr_scaling.value} needs it (>= 1)")
    if cfg.optim.grad_accum < 1:
        fail("optim.grad_accum", "must be >= 1")
    if cfg.optim.caption_lr is not None and not cfg.optim.caption_lr > 0:
        fail("optim.caption_lr", "must be > 0 (or null: the heads' lr)")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        fail("data.batch_size", "batch sizes must be >= 1")
    if cfg.data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    if cfg.data.prefetch_factor < 1:
        fail("data.prefetch_factor", "must be >= 1")
    names = []
    for i, src in enumerate(cfg.data.sources):
        if not src.shards_dir:
            fail(f"data.sources.{i}.shards_dir", "each source needs a shards_dir")
        if not src.weight > 0:
            fail(f"data.sources.{i}.weight", f"must be > 0, got {src.weight}")
        names.append(src.name or Path(src.shards_dir).name)
    if len(set(names)) != len(names):
        fail("data.sources", f"source names must differ (set name:), got {names}")
    if not cfg.data.train_min_sizes or min(cfg.data.train_min_sizes) < 32:
        fail("data.train_min_sizes", "needs at least one size >= 32")
    if max(cfg.data.train_min_sizes) > cfg.data.max_size or cfg.data.test_min_size > cfg.data.max_size:
        fail("data.max_size", "must be >= every min size")
    if cfg.checkpoint.keep_last < 1:
        fail("checkpoint.keep_last", "must be >= 1 (the newest checkpoint is always kept)")
    if cfg.loss.caption_weight < 0:
        fail("loss.caption_weight", "must be >= 0")
    if cfg.loss.balance == Balance.uncertainty and cfg.loss.task != Task.joint:
        fail("loss.balance", "uncertainty weighting needs loss.task=joint (two tasks to balance)")
    roi = cfg.model.roi
    n = len(roi.iou_thresholds)
    if n < 1 or len(roi.stage_loss_weights) != n or len(roi.bbox_stds) != n:
        fail("model.roi", "iou_thresholds, stage_loss_weights and bbox_stds need one entry per stage")
    if any(len(s) != 4 for s in roi.bbox_stds):
        fail("model.roi.bbox_stds", "each stage needs 4 stds (x, y, w, h)")
    if roi.head not in ROI_HEADS:
        fail("model.roi.head", f"unknown head '{roi.head}'; use one of {', '.join(ROI_HEADS)}")
    for key in ("box_loss_weight", "smooth_l1_beta"):
        if getattr(roi, key) < 0:
            fail(f"model.roi.{key}", "must be >= 0")
    if cfg.model.num_classes < 1:
        fail("model.num_classes", "must be >= 1")
    if len(cfg.model.rpn.anchor_sizes) != 5:
        fail("model.rpn.anchor_sizes", "needs exactly 5 sizes, one per FPN level (P2-P5 and pool)")
    cap = cfg.model.captioner
    bad_levels = set(cap.fpn_levels) - {"0", "1", "2", "3", "pool"}
    if bad_levels:
        fail("model.captioner.fpn_levels", f"unknown levels {sorted(bad_levels)}; use 0, 1, 2, 3, pool")
    if cap.object_tokens < 0:
        fail("model.captioner.object_tokens", f"must be >= 0, got {cap.object_tokens}")
    if not 0 <= cap.object_min_score < 1:
        fail("model.captioner.object_min_score", "must be in [0, 1)")
    if not 0 < cap.object_nms_iou <= 1:
        fail("model.captioner.object_nms_iou", "must be in (0, 1]")
    if cap.use_fpn_levels and cfg.loss.task == Task.caption:
        fail("model.captioner.use_fpn_levels", "FPN levels are not built for loss.task=caption")
    if cap.n_embd % cap.n_head:
        fail("model.captioner.n_embd", f"{cap.n_embd} is not divisible by n_head={cap.n_head}")
    if cfg.data.captions_per_image < 1:
        fail("data.captions_per_image", f"must be >= 1, got {cfg.data.captions_per_image}")
    if cfg.data.max_caption_tokens > cap.n_positions and not cap.pretrained:
        fail("data.max_caption_tokens", f"exceeds model.captioner.n_positions={cap.n_positions}")
    if cap.num_beams < 1:
        fail("model.captioner.num_beams", "must be >= 1")
    if not math.isfinite(cap.length_penalty):
        fail("model.captioner.length_penalty", "must be a finite number")
    if not 0.0 <= cap.label_smoothing < 1.0:
        fail("model.captioner.label_smoothing", "must be in [0, 1)")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        fail("max_bad_fraction", "must be in [0, 1]")


def to_yaml(cfg: Config | DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Config | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
