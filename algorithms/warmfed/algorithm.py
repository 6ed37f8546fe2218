"""WarmFed as an algorithm plug-in: the one-shot warm start, then rounds of aggregation and DSD.

    backbone         (server)  load the committed/cached tiny backbone, pretrain it on public data if
                               missing, or load Stable Diffusion from a local path
    lora             (clients) LoRA-fine-tune the frozen backbone on the client's own data; upload
                               only the LoRA tensors (+ which classes to synthesize), once
    synthesis        (server)  per client: load its LoRA, sample labelled images (the server's work,
                               fanned out over the client actor pool), save a grid
    server_finetune  (server)  train the global classifier on the union of synthetic data: the
                               one-shot global model; the synthetic set stays in the server state
    personalize      (clients) the one-shot personalized model: DSD from the warm start (round 0);
                               with `check_synthetic`, each client also labels the samples drawn
                               from its own LoRA (`check_judge`) and uploads one bit per sample;
                               the rounds' server fine-tunes keep those labelled as asked
    rounds 1..R      clients upload a model trained from the global one (`upload`), the server
                     averages and fine-tunes the average on the synthetic union again
                     (`round_server_epochs`, FGL's protocol); each client's personalized model is
                     DSD from the new global model with its own previous personalized model as the
                     teacher, kept in the client state store between rounds

What travels: up, once, the LoRA tensors and class counts; every round, the `upload` model
(`"ce"`: trained from the global model by plain cross-entropy for `train.local_epochs`, the
global path stays FedAvg's; `"dsd"`: the personalized student itself, as pFedSD). The
personalized model never leaves the client. Down: the global model (once more at round 0
for the one-shot personalization).

Each part has a switch: `personalize=false` (no LoRA: plain backbone samples),
`server_finetune=false` (rounds start from the random init), `round_server_epochs=0`,
`oneshot_personal=false`, `check_synthetic=false`, `dsd=false` (plain CE personalization),
`dsd_teacher=global` (or `both`: the two as one teacher).
Phases whose output nothing reads are skipped, and LoRA uploads and synthetic sets are reused
between variants of a run that provably share them (`reuse`, keyed by content).
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.base import (
    Aggregator,
    Algorithm,
    Broadcast,
    ClientContext,
    ClientUpdate,
    PersonalState,
    ServerContext,
    SetupPhase,
    Weights,
    load_weights,
    model_weights,
    rng_seed,
)
from algorithms.registry import register
from algorithms.warmfed.backbone import load_backbone
from algorithms.warmfed.dsd import DSDObjective, LogitEnsemble, client_weight
from algorithms.warmfed.messages import (
    ClientUploadBundle,
    SampleVerdicts,
    SynthesisJob,
    SynthesisResult,
    SyntheticCheck,
    WarmFedServerState,
)
from algorithms.warmfed.params import WarmFedParams
from algorithms.warmfed.pixel_map import PixelStats, auto_pixel_map
from algorithms.warmfed.reuse import NOT_LORA, NOT_SYNTHESIS, content_key, write_cached
from sim.devices import process_device
from sim.models import Classifier
from sim.training import cross_entropy, evaluate, local_sgd


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ±max_shift pixels (edge padding), the augmentation of server fine-tuning."""
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    h, w = x.shape[-2:]
    return pad[..., dy : dy + h, dx : dx + w]


@register("warmfed")
class WarmFed(Algorithm[WarmFedServerState, Broadcast, PersonalState]):
    Params = WarmFedParams
    stateful = True
    server_heavy = True  # backbone loading, fine-tuning on the synthetic union: worth a GPU share

    @classmethod
    def finetune_budget(cls, params: WarmFedParams, train: Any) -> str:
        what = "DSD" if params.dsd else "CE"
        lr = params.personal_lr if params.personal_lr is not None else cls.local_lr(params, train)
        return (
            f"{train.finetune_epochs} epochs of {what} per round at lr {lr:g} (whole model)"
            if train.finetune_epochs
            else "none"
        )

    @classmethod
    def local_lr(cls, params: WarmFedParams, train: Any) -> float:
        """The rounds' local rate: `round_lr`, else train.lr (the baselines' rate)."""
        return params.round_lr if params.round_lr is not None else train.lr

    def __init__(self, params: WarmFedParams, run: Any) -> None:
        super().__init__(params, run)
        if params.check_synthetic is True and not self._checks_synthetic:
            from sim.errors import ConfigError

            why = (
                "no round reads the checked set (round_server_epochs is 0)"
                if self._has_oneshot_personal
                else "it needs the one-shot personalization (oneshot_personal: true and train.finetune_epochs > 0): "
                "the clients check the samples with that model"
            )
            raise ConfigError(f"warmfed: check_synthetic: true, but {why}")
        if params.backbone == "stable-diffusion" and params.sd_model:
            self._check_sd_path(params.sd_model)

    @staticmethod
    def _check_sd_path(model: str) -> None:
        """Fail in the driver, before any actor starts, when a local backbone folder is missing."""
        from algorithms.warmfed.diffusion import BackboneError
        from algorithms.warmfed.diffusion.base import local_model_path

        path = local_model_path(model)
        if path is not None and not path.exists():
            raise BackboneError(f"backbone path does not exist: {path} (algo.warmfed.sd_model)")

    # ----- server state ------------------------------------------------------------------
    def init_server_state(self, weights: Weights) -> WarmFedServerState:
        return WarmFedServerState(weights)

    @property
    def cache_dir(self) -> Path:
        """Reused uploads and synthetic sets: inside the run directory, so one code version fills it."""
        return Path(self.run.run_dir) / "cache" / "warmfed"

    # ----- warm-start phases ---------------------------------------------------------------
    def setup_phases(self) -> list[SetupPhase[WarmFedServerState, Broadcast, PersonalState]]:
        phases: list[SetupPhase[WarmFedServerState, Broadcast, PersonalState]] = []
        if self.params.uses_synthetic:
            phases += [
                SetupPhase("backbone", None, self._server_backbone),
                SetupPhase("lora", self._client_lora_reused, self._server_collect, lambda upload: upload.nbytes),
                SetupPhase(
                    "synthesis",
                    server=self._server_synthesis,
                    work=self._synthesize_one,
                    work_items=self._synthesis_jobs,
                ),
                SetupPhase("server_finetune", None, self._server_finetune),
            ]
        if self._checks_synthetic:
            phases.append(
                SetupPhase(
                    "personalize",
                    personal=self._oneshot_personal,
                    message=self._synthetic_check,
                    server=self._server_keep_checked,
                    upload_nbytes=lambda verdicts: verdicts.nbytes if verdicts is not None else 0,
                )
            )
        elif self._has_oneshot_personal:
            phases.append(SetupPhase("personalize", personal=self._oneshot_personal))
        return phases

    @property
    def _has_oneshot_personal(self) -> bool:
        return self.params.oneshot_personal and self.run.train.finetune_epochs > 0

    @property
    def _checks_synthetic(self) -> bool:
        """Clients check their samples when a one-shot personalized model exists and a round reads the set."""
        return (
            self.params.check_synthetic is not False
            and self._has_oneshot_personal
            and self.params.round_server_epochs > 0
        )

    def _server_backbone(self, ctx: ServerContext, state: WarmFedServerState, uploads: list) -> WarmFedServerState:
        backbone = load_backbone(self.params, self.run, report=ctx.report)
        ctx.report("backbone_parameters", float(sum(p.numel() for p in backbone.unet.parameters())))
        return state

    def _client_lora(self, ctx: ClientContext) -> ClientUploadBundle:
        from algorithms.warmfed.lora import LoraConfig, privatize_upload, train_client_lora

        counts = np.bincount(ctx.data.y["train"].numpy(), minlength=self.run.model_spec.num_classes).astype(np.int32)
        if not self.params.personalize:
            return ClientUploadBundle(None, counts)
        backbone = load_backbone(self.params, self.run, public=ctx.public)
        pixel_map = self._pixel_map(ctx.public)
        cfg = LoraConfig(
            rank=self.params.lora_rank,
            steps=self.params.lora_steps,
            lr=self.params.lora_lr,
            batch_size=self.params.lora_batch_size,
            include_resnet_convs=self.params.lora_resnet_convs,
            include_embeddings=self.params.lora_embeddings,
            pixel_map=pixel_map,
            seed=rng_seed(self.run.seed, ctx.client_id, "lora") % (2**31),
        )
        reference = PixelStats.of(ctx.public.images) if pixel_map == "moments" else None
        with self.run.autocast(ctx.device):  # mixed precision on a GPU when the run asks; CPU: exact fp32
            upload = train_client_lora(backbone, ctx.data.x["train"], ctx.data.y["train"], cfg, reference=reference)
        if self.params.dp_clip > 0:
            upload = privatize_upload(
                upload,
                clip_norm=self.params.dp_clip,
                noise_multiplier=self.params.dp_noise,
                seed=rng_seed(self.run.seed, ctx.client_id, "dp") % (2**31),
            )
        return ClientUploadBundle(upload, counts)

    def _pixel_map(self, public: Any) -> str:
        """The pixel map the client LoRA trains with (`lora_pixel_map`, `auto` resolved: `auto_pixel_map`)."""
        kind = self.params.lora_pixel_map
        if kind == "auto":
            one_look = self.params.backbone == "tiny" and self._pretrain_augment() == "none"
            return auto_pixel_map(one_look, public is not None, private=self.params.dp_clip > 0)
        if kind == "moments" and public is None:
            raise ValueError(
                "algo.warmfed.lora_pixel_map=moments needs the dataset's public split (its pixel statistics)"
            )
        return kind

    def _pretrain_augment(self) -> str:
        from algorithms.warmfed.diffusion import TinyBackboneConfig

        return self.params.pretrain_augment or TinyBackboneConfig().augment

    def _lora_key(self, ctx: ClientContext, backbone: Any) -> str:
        """Everything that determines a client's upload: backbone, LoRA fields, seed, client, its data."""
        fields = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in NOT_LORA}
        return content_key(
            "lora",
            backbone.fingerprint(),
            fields,
            # the pixel map's reference: the public images' statistics
            self._pixel_map(ctx.public),
            ctx.public.fingerprint() if ctx.public is not None else "-",
            self.run.seed,
            ctx.client_id,
            ctx.data.x["train"],
            ctx.data.y["train"],
        )

    def _client_lora_reused(self, ctx: ClientContext) -> ClientUploadBundle:
        """`_client_lora`, or the upload an earlier variant of this run trained from the same inputs."""
        if not self.params.personalize or not self.params.reuse:
            return self._client_lora(ctx)
        from algorithms.warmfed.lora import LoraUpload

        key = self._lora_key(ctx, load_backbone(self.params, self.run, public=ctx.public))
        path = self.cache_dir / "lora" / f"{key}.safetensors"
        if path.exists():
            counts = np.bincount(ctx.data.y["train"].numpy(), minlength=self.run.model_spec.num_classes)
            return ClientUploadBundle(LoraUpload.from_bytes(path.read_bytes()), counts.astype(np.int32), key, True)
        bundle = self._client_lora(ctx)
        if bundle.lora is not None:
            write_cached(path, bundle.lora.to_bytes())
        return dataclasses.replace(bundle, key=key)

    def _server_collect(
        self, ctx: ServerContext, state: WarmFedServerState, uploads: list[ClientUploadBundle]
    ) -> WarmFedServerState:
        sizes = [u.lora.num_bytes for u in uploads if u.lora is not None]
        ctx.report("clients", float(len(uploads)))
        ctx.report("lora_bytes_per_client", float(np.mean(sizes)) if sizes else 0.0)
        ctx.report("trained", float(sum(u.lora is not None and not u.reused for u in uploads)))
        ctx.report("reused", float(sum(u.reused for u in uploads)))
        ctx.report("pixel_mapped", float(sum(u.lora is not None and u.lora.pixel_map is not None for u in uploads)))
        ctx.report("classifier_bytes", float(sum(t.numel() * t.element_size() for t in state.weights.values())))
        return dataclasses.replace(state, uploads=list(uploads))

    def _synthesis_jobs(self, state: WarmFedServerState) -> list[tuple[float, SynthesisJob]]:
        """One job per client, costed by its image count (the pool dispatches the largest first)."""
        if state.uploads is None:
            raise RuntimeError("warmfed: the synthesis phase needs the lora phase's uploads")
        jobs = []
        for client_id, upload in enumerate(state.uploads):
            want = np.where(upload.class_counts > 0, self.params.synth_per_class, 0)
            seed = rng_seed(self.run.seed, client_id, "synthesis") % (2**31)
            jobs.append((float(want.sum()), SynthesisJob(client_id, upload.lora, want, seed, upload.key)))
        return jobs

    def _synthesize_one(self, ctx: ServerContext, job: SynthesisJob) -> SynthesisResult:
        """Sample one client's images from its personalized backbone (on whichever actor runs it)."""
        import contextlib
        import time

        from algorithms.warmfed.lora import apply_lora
        from algorithms.warmfed.synthesis import synthesize

        backbone = load_backbone(self.params, self.run, public=ctx.public)
        path = None
        if self.params.reuse and (job.lora is None or job.key):
            fields = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in NOT_SYNTHESIS}
            source = job.key if job.lora is not None else f"base:{backbone.fingerprint()}"
            if self.run.mixed_precision != "fp32":  # bf16 samples differ from fp32 ones (fp32 keys unchanged)
                source = f"{source}:{self.run.mixed_precision}"
            key = content_key("synthesis", source, fields, job.want, job.seed)
            path = self.cache_dir / "synthesis" / f"{key}.npz"
            if path.exists():
                with np.load(path) as cached:
                    return SynthesisResult(job.client_id, cached["images"], cached["labels"], 0.0, True)
        start = time.perf_counter()
        scope = apply_lora(backbone, job.lora) if job.lora is not None else contextlib.nullcontext(backbone)
        with scope as personalized, self.run.sampling_autocast(process_device()):
            x, y = synthesize(
                personalized,
                job.want,
                steps=self.params.sampler_steps,
                guidance_scale=self.params.guidance_scale,
                seed=job.seed,
                sampler=self.params.sampler,
            )
        seconds = time.perf_counter() - start
        if path is not None:
            buffer = io.BytesIO()
            np.savez(buffer, images=x, labels=y)
            write_cached(path, buffer.getvalue())
        return SynthesisResult(job.client_id, x, y, seconds, False)

    def _server_synthesis(
        self, ctx: ServerContext, state: WarmFedServerState, results: list[SynthesisResult]
    ) -> WarmFedServerState:
        from algorithms.warmfed.synthesis import save_sample_grid

        grid_dir = ctx.artifacts_dir / self.name / f"seed{self.run.seed}"  # a variant keeps its own grids
        for res in results[: self.params.save_grids]:
            if len(res.labels):
                pick = np.concatenate([np.flatnonzero(res.labels == c)[:4] for c in np.unique(res.labels)])
                save_sample_grid(
                    res.images[pick],
                    res.labels[pick],
                    grid_dir / f"client{res.client_id:03d}.png",
                    nrow=12,
                    title=f"client {res.client_id}",
                )
        sampled = [r for r in results if not r.reused]
        seconds = sum(r.seconds for r in sampled)
        n_sampled = sum(len(r.labels) for r in sampled)
        union_x = np.concatenate([r.images for r in results]) if results else np.zeros((0,), np.float32)
        union_y = np.concatenate([r.labels for r in results]) if results else np.zeros((0,), np.int64)
        owner = np.concatenate([np.full(len(r.labels), r.client_id, np.int64) for r in results]) if results else None
        ctx.report("images", float(len(union_y)))
        ctx.report("images_per_s", n_sampled / seconds if seconds > 0 else math.nan)  # per actor
        ctx.report("sampling_s", seconds)  # summed over actors
        ctx.report("reused", float(len(results) - len(sampled)))
        # the uploads are spent: the synthetic union is what the next phases read
        return dataclasses.replace(state, uploads=None, synthetic_x=union_x, synthetic_y=union_y, synthetic_owner=owner)

    def _server_finetune(self, ctx: ServerContext, state: WarmFedServerState, uploads: list) -> WarmFedServerState:
        if self.params.server_finetune and state.has_synthetic:
            weights, loss = self._train_on_synthetic(
                state,
                self.params.server_epochs,
                self.params.server_lr,
                rng_seed(self.run.seed, "server_finetune"),
                ctx.device,
            )
            ctx.report("final_loss", loss)
            state = dataclasses.replace(state, weights=weights)
        if self.params.round_server_epochs == 0:  # the rounds do not read the synthetic set: drop it
            return WarmFedServerState(state.weights)
        return state

    def _train_on_synthetic(
        self, state: WarmFedServerState, epochs: int, lr: float, seed: int, device: torch.device
    ) -> tuple[Weights, float]:
        """Server-side cross-entropy on the state's synthetic union (shift augmentation, cosine rate),
        from its weights: the warm start and every round's fine-tune. Returns the new weights and
        the mean loss."""
        if state.synthetic_x is None or state.synthetic_y is None:
            raise RuntimeError("warmfed: no synthetic set to train on")
        model = self.run.build_model().to(device)
        load_weights(model, state.weights)
        model.train()
        # on the device once; the loss is summed there and read once (no host sync per step)
        x, y = torch.from_numpy(state.synthetic_x).to(device), torch.from_numpy(state.synthetic_y).to(device)
        g = torch.Generator().manual_seed(seed)
        bs = self.params.server_batch_size
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(len(y) / bs)))
        loss_sum, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), bs):
                idx = order[s : s + bs].to(device)
                if len(idx) < 2:
                    continue  # BatchNorm cannot train on a single sample
                xb = _shift(x[idx], self.params.augment_shift, g)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach().double()
                steps += 1
        return model_weights(model), float(loss_sum) / max(1, steps)

    def _oneshot_personal(
        self, ctx: ClientContext, message: Broadcast, client_state: PersonalState | None
    ) -> tuple[SampleVerdicts | None, PersonalState]:
        """The one-shot personalized model: DSD from the warm start, which is also its teacher.
        Sent its own synthetic samples (SyntheticCheck), the client also says which of them its
        judge (`_judge`), trained on its real data, labels as asked."""
        personal, _ = self._personalize(ctx, message.weights, None)
        verdicts = None
        if isinstance(message, SyntheticCheck):
            model = self._judge(ctx, message.weights)
            model.eval()
            with torch.no_grad():
                x = torch.tensor(message.images, device=ctx.device)  # a copy: Ray hands arrays over read-only
                pred = torch.cat([model(b).argmax(1) for b in x.split(512)]) if len(x) else torch.zeros(0)
            verdicts = SampleVerdicts(ctx.client_id, pred.cpu().numpy() == message.labels)
        return verdicts, PersonalState(personal)

    def _judge_lr(self) -> float:
        p = self.params
        return p.check_lr if p.check_lr is not None else self._personal_lr()

    def _judge(self, ctx: ClientContext, warm_start: Weights) -> Classifier:
        """The model that labels the client's synthetic samples; `ctx.model` holds the one-shot
        personalized model when this is called.

        `personal` judges with that model. Its DSD distils from the warm start, the very model the
        server fine-tuned on these samples, so it inherits the warm start's labels for them, wrong
        ones included. `ce` fine-tunes the warm start by plain CE on the client's real data only
        (same epochs, `check_lr`): pulled toward the real data alone, a more independent judge.
        When that is exactly how the personalized model was trained, it is that model."""
        p = self.params
        same_as_personal = not p.dsd and self._judge_lr() == self._personal_lr()
        if p.check_judge == "personal" or same_as_personal:
            return ctx.model
        judge = ctx.scratch_model("judge")
        load_weights(judge, warm_start)
        self._fine_tune_ce(ctx, judge, self._judge_lr())
        return judge

    def _fine_tune_ce(self, ctx: ClientContext, model: Classifier, lr: float) -> dict[str, float]:
        """Plain CE on the client's data for the personalization budget: the dsd=false personalized
        model and the CE judge are the same training, so the judge reproduces that model exactly."""
        return local_sgd(
            ctx, model, loss_fn=cross_entropy, epochs=self.run.train.finetune_epochs, lr=lr, purpose="personal"
        )

    def _personal_lr(self) -> float:
        p = self.params
        return p.personal_lr if p.personal_lr is not None else self.local_lr(p, self.run.train)

    def _synthetic_check(self, state: WarmFedServerState, client_id: int) -> Broadcast:
        """The warm start and, when the rounds will read the synthetic set, this client's own samples."""
        if not state.has_synthetic or state.synthetic_owner is None:
            return Broadcast(state.weights)
        mine = state.synthetic_owner == client_id
        assert state.synthetic_x is not None and state.synthetic_y is not None
        return SyntheticCheck(state.weights, state.synthetic_x[mine], state.synthetic_y[mine])

    def message_nbytes(self, message: Broadcast) -> int:
        extra = message.images.nbytes + message.labels.nbytes if isinstance(message, SyntheticCheck) else 0
        return super().message_nbytes(message) + extra

    def _server_keep_checked(
        self, ctx: ServerContext, state: WarmFedServerState, verdicts: list[SampleVerdicts | None]
    ) -> WarmFedServerState:
        """The rounds' synthetic set: every sample a client's personalized model labels as asked
        (samples of clients that did not check, e.g. held-out ones, stay)."""
        if not state.has_synthetic or state.synthetic_owner is None:
            return state
        assert state.synthetic_x is not None and state.synthetic_y is not None
        keep = np.ones(len(state.synthetic_y), bool)
        for v in verdicts:
            if v is not None:
                keep[state.synthetic_owner == v.client_id] = v.keep
        ctx.report("synthetic_kept", float(keep.mean()))
        return dataclasses.replace(
            state,
            synthetic_x=state.synthetic_x[keep],
            synthetic_y=state.synthetic_y[keep],
            synthetic_owner=state.synthetic_owner[keep],
        )

    # ----- rounds --------------------------------------------------------------------------
    def finish_round(self, state: WarmFedServerState, aggregator: Aggregator) -> WarmFedServerState:
        """FedAvg's mean, then (FGL's protocol) a few epochs on the synthetic union."""
        state = super().finish_round(state, aggregator)
        if self.params.round_server_epochs > 0 and state.has_synthetic and aggregator.count > 0:
            device = process_device()  # what Ray gave the server actor (CPU without a share)
            weights, _ = self._train_on_synthetic(
                state,
                self.params.round_server_epochs,
                self.params.round_server_lr,
                rng_seed(self.run.seed, "round_finetune", state.rounds_done + 1),
                device,
            )
            state = dataclasses.replace(state, weights=weights)
        return dataclasses.replace(state, rounds_done=state.rounds_done + 1)

    def _personalize(
        self, ctx: ClientContext, global_weights: Weights, previous: Weights | None
    ) -> tuple[Weights, dict[str, float]]:
        """The client's new personalized model: the student starts from the newest global model and
        trains on the client's data for `train.finetune_epochs`, by DSD with the client's previous
        personalized model as the teacher (the global model itself when there is none yet)."""
        p = self.params
        student = ctx.model
        load_weights(student, global_weights)
        epochs = self.run.train.finetune_epochs
        if epochs == 0:
            return model_weights(student), {}
        lr = self._personal_lr()
        if not p.dsd:
            metrics = self._fine_tune_ce(ctx, student, lr)
            return model_weights(student), {"personal_loss": metrics["train_loss"]}
        teacher: torch.nn.Module = ctx.scratch_model("teacher")
        load_weights(teacher, previous if previous is not None and p.dsd_teacher != "global" else global_weights)
        if p.dsd_teacher == "both" and previous is not None:
            newest = ctx.scratch_model("teacher_global")
            load_weights(newest, global_weights)
            teacher = LogitEnsemble(teacher, newest)
        cfg = p.dsd_config()
        weight = 1.0
        if cfg.client_weighting != "none":
            x_val, y_val = ctx.data.x["val"], ctx.data.y["val"]
            weight = client_weight(cfg, evaluate(teacher, x_val, y_val)[0], evaluate(student, x_val, y_val)[0])
        total = epochs * math.ceil(ctx.data.size("train") / ctx.train_cfg.batch_size)
        objective = DSDObjective(teacher, cfg, total, weight)
        metrics = local_sgd(ctx, student, loss_fn=objective, epochs=epochs, lr=lr, purpose="personal")
        return model_weights(student), {
            "personal_loss": metrics["train_loss"],
            "dsd_steps": float(objective.step),
            "dsd_client_weight": weight,
            "dsd_kl": float(np.mean(objective.kls)) if objective.kls else 0.0,
        }

    def local_train(
        self, ctx: ClientContext, message: Broadcast, client_state: PersonalState | None
    ) -> tuple[ClientUpdate, PersonalState]:
        previous = client_state.personal if client_state else None
        personal, personal_metrics = self._personalize(ctx, message.weights, previous)
        if self.params.upload == "ce":
            ctx.load_model(message.weights)
            metrics = local_sgd(ctx, ctx.model, loss_fn=cross_entropy, lr=self.local_lr(self.params, self.run.train))
            upload = model_weights(ctx.model)
        else:
            metrics, upload = {"train_loss": personal_metrics.get("personal_loss", math.nan)}, personal
        update = ClientUpdate(ctx.client_id, upload, ctx.data.size("train"), {**metrics, **personal_metrics})
        return update, PersonalState(personal)

    def personal_weights(
        self, ctx: ClientContext, message: Broadcast, client_state: PersonalState | None
    ) -> Weights | None:
        if client_state is not None:
            return client_state.personal
        return None  # no personalized model yet (one-shot personalization off, or a new client): the global one
