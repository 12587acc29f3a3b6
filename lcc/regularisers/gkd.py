"""Graph knowledge distillation (LGG paper, sec. 4.1, eq. 7).

A frozen teacher runs on the batch's inputs; for each pair (teacher layer, student layer) the
term is the Frobenius norm between the two degree-normalised latent geometry graphs of the
batch (:func:`lcc.engine.lgg.gkd_distance`), averaged over the pairs. Latent dimensions may
differ. ``distinct_classes=true`` (the paper's discussion) builds both graphs between labelled
samples of distinct classes only (each sample's k nearest among the other classes); otherwise
every sample of the batch counts, labelled or not.

The teacher is a model spec (``small-resnet``, ``hf:NAME``, ...) with ``teacher_checkpoint``
weights (a built-in spec without them is untrained: a warning says so), a checkpoint path whose
file names its architecture (key ``model`` or ``hyper_parameters.model``) or that an ``lcc
train`` run wrote (``RUN/checkpoints/last.ckpt``: ``RUN/config.yaml`` names the model), or, in
Python, an ``nn.Module`` (``GraphDistillation(teacher=m)``).
It is kept out of this module's parameters and ``state_dict`` (checkpoints hold the student
only), stays in eval mode without gradients, and follows the batch's device. Checkpoints load
with ``torch.load(weights_only=True)``.

>>> import torch
>>> from lcc.regularisers.base import Batch
>>> teacher = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
>>> student = torch.nn.Sequential(torch.nn.Linear(3, 2))
>>> reg = GraphDistillation(teacher=teacher, teacher_layers=["1"], layers=["output"], k=2)
>>> reg.bind(student, num_classes=2)
>>> x = torch.randn(6, 3)
>>> batch = Batch(latents={}, y=torch.zeros(6, dtype=torch.long), indices=torch.arange(6),
...               logits=student(x), x=x)
>>> loss = reg(batch); loss.backward()
>>> bool(loss > 0), sum(1 for _ in reg.parameters()), len(reg.state_dict())
(True, 0, 0)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lcc.engine.lgg import distinct_classes_mask, gkd_distance, latent_graph
from lcc.errors import LCCInputError
from lcc.regularisers.base import OUTPUT, Batch, Regulariser
from lcc.regularisers.gkd_options import GraphDistillationOptions, check_pairs
from lcc.regularisers.label_variation import attached_zero
from lcc.zoo.latents import LatentRecorder, call_model, check_layer_names, first_tensor

__all__ = ["Distillation", "GraphDistillation", "GraphDistillationOptions"]


def _model_spec(path: Path) -> str:
    """The architecture a checkpoint file names (``model`` / ``hyper_parameters.model``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LCCInputError(
            f"cannot read teacher checkpoint {path} with weights_only=True ({type(error).__name__})"
            "; pass teacher=SPEC,teacher_checkpoint=PATH with a plain state_dict"
        ) from None
    if isinstance(obj, Mapping):
        for holder in (obj, obj.get("hyper_parameters")):
            if isinstance(holder, Mapping) and isinstance(holder.get("model"), str):
                return holder["model"]
    run_config = path.parent.parent / "config.yaml"
    if path.parent.name == "checkpoints" and run_config.is_file():
        return _run_model(run_config)
    raise LCCInputError(
        f"teacher checkpoint {path} does not name its model (nor is it RUN/checkpoints/*.ckpt "
        f"beside a RUN/config.yaml); pass teacher=SPEC (e.g. small-resnet) and "
        f"teacher_checkpoint={path}"
    )


def _run_model(config: Path) -> str:
    """The ``model`` of an ``lcc train`` run's ``config.yaml`` (the checkpoints' architecture)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise LCCInputError(f"cannot read {config} for the teacher's model: {error}") from None
    model = data.get("model") if isinstance(data, Mapping) else None
    if not isinstance(model, str) or not model.strip():
        raise LCCInputError(
            f"{config} names no model for the teacher; pass teacher=SPEC,teacher_checkpoint=PATH"
        )
    return model.strip()


def _check_weights_only(path: Path) -> None:
    """Refuse checkpoints that only load by unpickling code (load_checkpoint would fall back)."""
    if path.suffix == ".safetensors" or not path.is_file():
        return  # safetensors never execute code; a missing file is reported by load_checkpoint
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LCCInputError(
            f"teacher checkpoint {path} does not load with weights_only=True "
            f"({type(error).__name__}); save the teacher's state_dict with torch.save"
        ) from None


def _device_of(x: object) -> torch.device | None:
    if isinstance(x, Tensor):
        return x.device
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for value in values:
        found = _device_of(value)
        if found is not None:
            return found
    return None


class Distillation(Regulariser):
    """What the regularisers distilling from a frozen teacher (``gkd``, ``rkd``) share: the
    teacher given in the options (a spec) or in Python (``teacher=module``), kept by
    :meth:`_adopt`, and its layers."""

    labeled_only = False

    def __init__(
        self,
        options: Any = None,
        *,
        teacher: nn.Module | str | None = None,
        **overrides: Any,
    ) -> None:
        module = teacher if isinstance(teacher, nn.Module) else None
        if teacher is not None and module is None:
            overrides["teacher"] = teacher
        super().__init__(options, **overrides)
        if module is None and not self.options.teacher:
            raise LCCInputError(
                f"{self.name} needs a teacher: teacher=SPEC,teacher_checkpoint=PATH (or a "
                f"checkpoint path naming its model), or {type(self).__name__}(teacher=module) "
                "in Python"
            )
        self._adopt(module)

    def _adopt(self, module: nn.Module | None) -> None:
        """Keep the teacher ``module`` (None: :meth:`bind` builds it from the options)."""
        raise NotImplementedError

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None before :meth:`bind` builds it from a spec)."""
        raise NotImplementedError

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """Teacher layers paired with :attr:`layers` (default: the same names)."""
        return tuple(self.options.teacher_layers) or self.layers

    def describe(self) -> str:
        text = super().describe()
        if self.teacher is not None and not self.options.teacher:
            text = text.replace("teacher=,", f"teacher={type(self.teacher).__name__},", 1)
        return text


class GraphDistillation(Distillation):
    """The ``gkd`` regulariser (summary and options: :class:`GraphDistillationOptions`).

    Mean over the pairs (``teacher_layers[i]``, ``layers[i]``) of ``||A_T - A_S||_F``, the
    Frobenius distance between the degree-normalised latent geometry graphs of the batch in
    teacher and student; needs the batch's inputs (``Batch.x``).
    """

    name = "gkd"
    Options = GraphDistillationOptions

    def _adopt(self, module: nn.Module | None) -> None:
        self.labeled_only = bool(self.options.distinct_classes)
        # plain containers: the teacher is neither a submodule nor in state_dict()
        self._teacher: list[nn.Module] = [module] if module is not None else []
        self._recorder: list[LatentRecorder] = []
        self._device: list[torch.device] = []
        self._bound = False

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None before :meth:`bind` builds it from a spec)."""
        return self._teacher[0] if self._teacher else None

    def bind(self, model: nn.Module, *, num_classes: int, sample: Any = None) -> None:
        """Build (or adopt) the frozen teacher and validate its layers."""
        if not self._teacher:
            self._teacher.append(self._build_teacher(num_classes, sample))
        if self.layers:  # else the trainer's default layers come later: checked at first batch
            self._setup()

    def _build_teacher(self, num_classes: int, sample: Any) -> nn.Module:
        from lcc.zoo.models import BUILTINS, build_model

        spec, checkpoint = self.options.teacher, self.options.teacher_checkpoint
        if Path(spec).expanduser().is_file():
            if checkpoint is not None:
                raise LCCInputError(
                    f"teacher={spec} is a file and teacher_checkpoint={checkpoint} another; "
                    "pass teacher=SPEC,teacher_checkpoint=PATH"
                )
            checkpoint = spec
            spec = _model_spec(Path(spec).expanduser())  # read with weights_only=True
        elif checkpoint is not None:
            _check_weights_only(Path(checkpoint).expanduser())

        if not isinstance(sample, Tensor) or sample.ndim != 4:
            raise LCCInputError(
                "gkd builds its teacher from a sample batch of images (B, C, H, W); the trainer "
                "passes it to bind(model, num_classes=..., sample=...)"
            )
        if checkpoint is None and spec.strip().lower() in BUILTINS:
            warnings.warn(
                f"gkd: teacher={spec} has no teacher_checkpoint, so it distils from an untrained "
                "(randomly initialised) teacher; pass teacher_checkpoint=PATH or "
                "teacher=RUN/checkpoints/last.ckpt",
                stacklevel=3,
            )
        return build_model(
            spec, num_classes, input_shape=tuple(sample.shape[1:]), checkpoint=checkpoint
        )

    def _setup(self) -> None:
        teacher = self.teacher
        if teacher is None:
            raise LCCInputError(
                "gkd has no teacher yet; call bind(model, num_classes=..., sample=...) first"
            )
        if not self.layers:
            raise LCCInputError("gkd reads no student layer; pass layers=NAME[,NAME...]")
        check_pairs(self.teacher_layers, self.layers)
        hooked = [name for name in dict.fromkeys(self.teacher_layers) if name != OUTPUT]
        if hooked:
            self._check_teacher_layers(teacher, hooked)
        teacher.eval()
        teacher.requires_grad_(False)
        self._recorder[:] = []
        if hooked:  # hooks live only during the teacher's forward (copies stay independent)
            self._recorder.append(LatentRecorder(teacher, hooked, pool=self.options.teacher_pool))
        self._bound = True

    def _check_teacher_layers(self, teacher: nn.Module, names: list[str]) -> None:
        """``check_layer_names`` on the teacher, its error saying that it is the teacher's."""
        try:
            check_layer_names(teacher, names)
        except LCCInputError as error:
            which = "teacher_layers" if self.options.teacher_layers else (
                "teacher_layers (default: the student's layers)"
            )  # fmt: skip
            text = str(error).removeprefix("model ")
            spec = self.options.teacher
            if spec and not Path(spec).expanduser().is_file():
                text = text.replace("`lcc layers MODEL`", f"`lcc layers {spec}`")
            raise LCCInputError(f"gkd {which}: the teacher {text}") from None

    def _teacher_latents(self, x: object) -> dict[str, Tensor]:
        if x is None:
            raise LCCInputError("gkd needs the batch inputs (Batch.x) to run its teacher")
        if not self._bound:
            self._setup()
        teacher = self.teacher
        assert teacher is not None
        device = _device_of(x)
        if device is not None and self._device != [device]:
            teacher.to(device)
            self._device[:] = [device]
        recorder = self._recorder[0] if self._recorder else None
        outputs: dict[str, Tensor] = {}
        with torch.no_grad():
            if recorder is None:
                logits = first_tensor(call_model(teacher, x), "teacher output")
            else:
                recorder.clear()
                with recorder:
                    logits = first_tensor(call_model(teacher, x), "teacher output")
                outputs = dict(recorder.outputs)
                recorder.clear()
        outputs[OUTPUT] = logits.reshape(logits.shape[0], -1)
        missing = [name for name in self.teacher_layers if name not in outputs]
        if missing:
            raise LCCInputError(f"teacher layer(s) {missing} did not run in the teacher's forward")
        return {name: outputs[name].detach() for name in self.teacher_layers}

    def forward(self, batch: Batch) -> Tensor:
        teacher = self._teacher_latents(batch.x)
        rows: Tensor | slice = slice(None)
        mask = None
        if self.options.distinct_classes:
            rows = batch.labeled
            mask = distinct_classes_mask(batch.y[rows])
        terms = []
        for teacher_name, student_name in zip(self.teacher_layers, self.layers, strict=True):
            student_z = batch.layer(student_name)[rows]
            teacher_z = teacher[teacher_name][rows]
            if teacher_z.shape[0] != student_z.shape[0]:
                raise LCCInputError(
                    f"teacher layer {teacher_name!r} has {teacher_z.shape[0]} rows but student "
                    f"layer {student_name!r} has {student_z.shape[0]}; pass the batch's inputs"
                )
            terms.append(self._distance(teacher_z, student_z, mask))
        return torch.stack(terms).mean()

    def _distance(self, teacher_z: Tensor, student_z: Tensor, mask: Tensor | None) -> Tensor:
        n = int(student_z.shape[0])
        if n < 2:
            return attached_zero(student_z)
        options = self.options
        graph = {
            "similarity": options.similarity,
            "bandwidth": options.bandwidth,
            "normalize": options.normalize,
            "mask": mask,
        }
        k = min(options.k, n - 1)
        target = latent_graph(teacher_z.to(student_z.device), k, **graph)
        return gkd_distance(target, latent_graph(student_z, k, **graph))
