"""The trainer's options, declared once.

Each option is a dataclass field with its default, help text and bound; the fields are grouped in parts, and each
command (``stage1``, ``stage2``, ``sft``) is the parts it shows. From these declarations come the command line
(``rot_train.launch``), the defaults, the ``--config`` YAML files, run.json's ``"config"`` and ``validate()``.
``TrainConfig`` holds every part, so the training loop reads ``cfg.lora_r`` wherever it is; a stage ignores the
options it does not show (they keep their defaults).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

from rot_data import registry
from rot_data.ranges import refuse_out_of_range

CONFIGS = Path(__file__).parent / "configs"  # the DeepSpeed configs (zero2.json, zero3.json) and the official runs' YAML
MODES = ("rot", "sft-cot", "sft-nocot")
ROLLOUTS = ("graphs", "eager")
LATENT_GRADIENTS = ("official", "detached")
# The official configuration's per-stage values: Stage I trains the head on MSE x10 + LM loss, Stage II (and the SFT
# baselines) on the LM loss alone; ``vision_weight=None`` (the API's default) takes the stage's.
STAGE_DEFAULTS = {1: {"vision_weight": 10.0}, 2: {"vision_weight": 0.0}}


def option(default=MISSING, help: str = "", *, at_least: int | None = None, default_factory=MISSING, show_default=None) -> Field:
    """A field of the trainer's config: its default, its ``--help`` text, the lowest value it takes (refused below it
    with a one-line error naming the flag)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "at_least": at_least, "show_default": show_default})


@dataclass(kw_only=True)
class RunOptions:
    """Every command: the data and backbone, the run folder, batch and schedule, DeepSpeed, checkpoints."""

    shards: str = option(help="shard folder written by rot-render build")
    backbone: str = option(registry.ANCHOR, "'anchor' (the shipped pretrained VLM), or a hub id or folder: a Qwen-VL "
                           "checkpoint (language model only is loaded) or any causal LM")
    out: str = option(help="run folder: checkpoints/, export/, metrics.jsonl, tensorboard/, loss.png, run.json")
    zero: int | None = option(None, "ZeRO stage 2 or 3: the DeepSpeed configs in rot_train/configs (default: 2)")
    ds_config: str | None = option(None, "a DeepSpeed config file of your own (instead of --zero)",
                                   show_default="rot_train/configs/zero2.json")
    # samples per optimizer step on any number of GPUs: the official 16 per GPU x 4 accumulation steps x 2 GPUs
    global_batch: int = option(128, "samples per optimizer step, whatever the number of GPUs (official: 128)", at_least=1)
    micro_batch: int | None = option(None, "samples per GPU per micro step, a divisor of the global batch per GPU (default: "
                                     "the largest that fits the GPU's memory, probed on the longest rows; on a CPU the whole "
                                     "per-rank batch); accumulation makes up the rest", at_least=1)
    epochs: int = option(2, "passes over the shards (official: 2)", at_least=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps", at_least=1)
    # a run cut by a GPU call's or a SLURM job's limit loses everything, so stop at the first optimizer step after this
    # many seconds of training (setup not counted) and end as a finished run does (checkpoint, export)
    max_seconds: float | None = option(None, "wall-clock budget: stop at the first optimizer step after this many seconds of "
                                       "training (setup not counted), then checkpoint and export as a finished run does "
                                       "(for time-limited GPU calls and jobs; --resume continues)")
    decay_by_deadline: bool = option(False, "decay the learning rate to 0 at --max-seconds, not at the planned last "
                                     "step: for a run whose budget is the clock (a GPU call's last phase), not a piece "
                                     "to --resume")
    lr: float = option(2e-5, "peak learning rate (official: 2e-5), reached after the warm-up, then decayed linearly", at_least=0)
    warmup_steps: int = option(20, "optimizer steps of linear warm-up (official: 20; at most half of the run's steps)", at_least=0)
    # the SFT baselines carry an (untrained) head of this width in their export, and the pipelines give every command
    # one line of options: so every command takes it
    head_width: int = option(2048, "projection head width (official: 2048)", at_least=1)
    # activation checkpointing: a third more compute for far less memory; None: only where memory needs it
    gradient_checkpointing: bool | None = option(None, "recompute each layer's activations in the backward pass (a third more "
                                                 "compute, far less memory); default: only where memory needs it (on a GPU, "
                                                 "off when the micro-batch fits without it; on a CPU on)")
    # the teacher-forced passes without their padding and latent holes (rot_model.RoTModel.decode): 1.39x a Stage I step
    # at the 4B shape on one H100 (docs/benchmarks.md); None: on where it runs as one flash-attention call
    packing: bool | None = option(None, "run the teacher-forced passes on each row's real tokens only, packed into one "
                                  "sequence with variable-length attention, instead of padded rows (the same losses and "
                                  "gradients); default: on a GPU on where the backbone can pack, on a CPU off")
    seed: int = option(0, "seed of the data order, the new token rows and dropout", at_least=0)
    # rows wait in this buffer before they are drawn: larger mixes better, costs host memory (rows, not embeddings)
    shuffle_buffer: int = option(1024, "rows in the seeded shuffle buffer each rank draws from", at_least=1)
    num_workers: int = option(1, "data-loader worker processes per rank", at_least=0)
    save_every: int = option(0, "checkpoint every N optimizer steps (0: only at the end)", at_least=0)
    keep_checkpoints: int = option(2, "keep the N newest checkpoints in <out>/checkpoints, delete older ones (0: keep all)",
                                   at_least=0)
    resume: bool = option(False, "continue from the latest checkpoint in <out>/checkpoints")
    log_ids: bool = option(False, "write the ids each rank consumed to ids-rank<N>.jsonl")


@dataclass(kw_only=True)
class LatentOptions:
    """Stage I and II: the latents the model rolls out and the losses on them."""

    max_latents: int | None = option(None, "cap on the latents trained per sample (default: one per visual token of the CoT, "
                                     "as the official code)", at_least=1)
    # fewer reasoning steps than visual tokens (issue 33's compression curve): the target of a latent is the mean of
    # this many consecutive visual embeddings; Stage II must use its Stage I's value (its head predicts those means)
    merge_latents: int = option(1, "visual tokens per latent: each latent predicts the mean of this many consecutive visual "
                                "embeddings (2: half the latents; default 1, one per visual token as the official code)",
                                at_least=1)
    inference_latents: int | None = option(None, "latent budget recorded in the export for rot-eval (default: the shards' "
                                           "mean latents per row, or --max-latents if lower)", at_least=1)
    vision_weight: float | None = option(None, "weight of the MSE to the visual embeddings (official: 10 in Stage I, 0 in "
                                         "Stage II)", at_least=0)
    lm_weight: float = option(1.0, "weight of the LM loss on <img_end> + answer", at_least=0)
    # both on the decoding engine: "graphs" replays each step as a CUDA graph, "eager" launches it kernel by kernel
    rollout: str | None = option(None, "how latents are rolled out on the decoding engine: 'graphs' (each step replayed as a "
                                 "CUDA graph) or 'eager' (default: graphs on a GPU unless --zero 3, else eager)")


@dataclass(kw_only=True)
class StageTwoOptions:
    """Stage II only: where the head comes from, how the answer loss reaches the LLM, the miniature's variants."""

    init: str | None = option(None, "the Stage I export folder (<stage1 --out>/export); required")
    latent_gradient: str = option("official", "'official' (the answer loss trains the LLM through its latents) or 'detached'")
    # the first `curriculum_steps` optimizer steps feed every latent slot the true visual embedding, then every
    # `curriculum_steps` steps `curriculum_stride` more leading slots become the model's own rollout, until all are
    curriculum_steps: int = option(0, "teacher-force the latents with the true visual embeddings, handing --curriculum-stride "
                                   "more of them to the rollout every N optimizer steps (0: off, the official forward)")
    curriculum_stride: int = option(4, "latents handed from teacher forcing to the rollout per curriculum stage")
    reader_weight: float = option(0.0, "weight of a frozen copy of the backbone VLM reading the predicted latents as the "
                                  "drawn CoT (cross-entropy; 0: off, the official loss)", at_least=0)
    train_head: bool = option(False, "keep training the projection head (the official Stage II freezes it)")
    stop_weight: float = option(0.0, "weight of the learned stop: the LM head's <img_end> probability trained at every "
                                "latent step (1 after a row's own last latent, 0 before), so rot-eval --learned-stop lets "
                                "the model choose its thinking length (0: off, the official loss)", at_least=0)


@dataclass(kw_only=True)
class FinetuneOptions:
    """Stage II and the SFT baselines: how the LLM is trained."""

    lora_r: int = option(16, "LoRA rank (official: 16)", at_least=1)
    lora_alpha: int = option(32, "LoRA alpha (official: 32)", at_least=0)
    lora_dropout: float = option(0.05, "LoRA dropout (official: 0.05)", at_least=0)
    lora_targets: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                     help="the projections LoRA adapts (repeat the option; official: q/k/v/o)")
    full_finetune: bool = option(False, "train every LLM weight instead of LoRA")


@dataclass(kw_only=True)
class BaselineOptions:
    """The SFT baselines only."""

    mode: str = option("rot", "sft-cot (question -> CoT -> answer) or sft-nocot (question -> answer)")


@dataclass(frozen=True)
class Command:
    """A ``rot-train`` command: the stage it trains, its mode, and the parts of the config it shows."""

    name: str
    stage: int
    mode: str
    parts: tuple
    help: str

    def fields(self) -> list[Field]:
        return [f for part in self.parts for f in fields(part)]

    def defaults(self) -> dict:
        """Every option's default for this command: the field's, the stage's official value, the command's mode."""
        presets = {**STAGE_DEFAULTS[self.stage], "mode": self.mode}
        return {f.name: presets.get(f.name, default_of(f)) for f in self.fields()}


COMMANDS = {command.name: command for command in (
    Command("stage1", 1, "rot", (RunOptions, LatentOptions), "RoT Stage I: train the projection head, LLM frozen."),
    Command("stage2", 2, "rot", (RunOptions, LatentOptions, StageTwoOptions, FinetuneOptions),
            "RoT Stage II: LoRA on the LLM (or --full-finetune), head frozen."),
    Command("sft", 2, "sft-cot", (RunOptions, FinetuneOptions, BaselineOptions),
            "SFT baselines (question -> CoT -> answer, or question -> answer) with the Stage II settings."),
)}


def default_of(f: Field):
    """A field's default; None for the required ones (--shards, --out)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


@dataclass(kw_only=True)
class TrainConfig(RunOptions, LatentOptions, StageTwoOptions, FinetuneOptions, BaselineOptions):
    """One training run: every part's options, the stage (1 or 2) and the mode. Checked as it is made (``validate``)."""

    stage: int

    def __post_init__(self):
        for key, value in STAGE_DEFAULTS.get(self.stage, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()

    @property
    def command(self) -> Command:
        return COMMANDS["stage1" if self.stage == 1 else "stage2" if self.mode == "rot" else "sft"]

    def options(self) -> dict:
        """This run's options under their names, as ``--config`` reads them back (run.json's ``"config"``)."""
        return {f.name: getattr(self, f.name) for f in self.command.fields()}

    @property
    def deepspeed_file(self) -> str:
        """The DeepSpeed config: ``--ds-config``, else rot_train/configs/zero<--zero>.json (ZeRO-2 by default)."""
        return self.ds_config or str(CONFIGS / f"zero{self.zero or 2}.json")

    def rolled_out(self, step: int) -> int | None:
        """Leading latents the model rolls out itself at optimizer step ``step`` (None: all of them)."""
        return self.curriculum_stride * (step // self.curriculum_steps) if self.curriculum_steps else None

    def validate(self) -> None:
        """Every check on the values themselves, each a one-line ValueError naming the flag and the fix. (What needs the
        files, such as the --out folder and the --init export, is checked as a run opens them.)"""
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage {self.stage}: use 1 or 2 (rot-train stage1, stage2)")
        if self.mode not in MODES or (self.mode != "rot" and self.stage != 2):
            raise ValueError(f"--mode {self.mode}: use rot (Stage I or II) or sft-cot / sft-nocot (rot-train sft)")
        refuse_out_of_range(self, AT_LEAST_ONE, NOT_NEGATIVE, OPTIONAL)
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"--max-seconds {self.max_seconds:g}: use a number of seconds > 0 (leave it out for no time limit)")
        if self.decay_by_deadline and self.max_seconds is None:
            raise ValueError("--decay-by-deadline decays the learning rate to 0 at --max-seconds: give --max-seconds too")
        if self.rollout not in (None, *ROLLOUTS):
            raise ValueError(f"--rollout {self.rollout}: use one of {', '.join(ROLLOUTS)} (leave it out for the default)")
        if self.latent_gradient not in LATENT_GRADIENTS:
            raise ValueError(f"--latent-gradient {self.latent_gradient}: use one of {', '.join(LATENT_GRADIENTS)}")
        if self.zero not in (None, 2, 3):
            raise ValueError(f"--zero {self.zero}: use 2 or 3 (rot_train/configs/zero2.json, zero3.json), or --ds-config <file>")
        if self.zero is not None and self.ds_config is not None:
            raise ValueError("--zero and --ds-config both name a DeepSpeed config: pass one of them")
        if self.curriculum_steps < 0 or self.curriculum_stride < 1:
            raise ValueError(f"--curriculum-steps {self.curriculum_steps} / --curriculum-stride {self.curriculum_stride}: "
                             "use steps >= 0 (0: off) and a stride >= 1")
        if self.curriculum_steps and (self.stage != 2 or self.mode != "rot"):
            raise ValueError("--curriculum-steps is a Stage II option (rot-train stage2): Stage I trains the head on the full rollout")
        if self.reader_weight and (self.stage != 2 or self.mode != "rot" or self.max_latents or self.merge_latents > 1):
            raise ValueError("--reader-weight is a Stage II option (rot-train stage2) for uncapped latents, one per visual "
                             "token: the reader reads the whole line, so drop --max-latents and --merge-latents")


def _bounded(lowest: int) -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("at_least") == lowest)


AT_LEAST_ONE = _bounded(1)
NOT_NEGATIVE = _bounded(0)
OPTIONAL = tuple(f.name for f in fields(TrainConfig) if f.default is None)  # None: not given, the default decides


def from_file(path: Path, command: Command) -> dict:
    """The option values a ``--config`` file gives: a YAML (or JSON) mapping of option names (``global_batch: 128``), or a
    run's run.json (its ``"config"``, from a run of the same command). Values are not converted here (the command line's
    types do that); a key that is no option of this command is a one-line error naming it and the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not YAML: {' '.join(str(error).split())}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):  # a run.json
        ran = data.get("command", command.name)
        if ran != command.name:
            raise ValueError(f"--config {path} is the run.json of a rot-train {ran} run: give it to rot-train {ran}, or write "
                             f"the options this one should take in a YAML file")
        data = data["config"]
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected lines of 'option_name: value' (e.g. global_batch: 128)")
    names = {f.name for f in command.fields()}
    for key in data:
        if key not in names:
            elsewhere = [c.name for c in COMMANDS.values() if key in {f.name for f in c.fields()}]
            where = (f"it is an option of rot-train {' and '.join(elsewhere)}" if elsewhere else
                     "the keys are the option names with underscores, e.g. global_batch")
            raise ValueError(f"--config {path}: '{key}' is not an option of rot-train {command.name} ({where})")
    return data
