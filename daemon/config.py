"""Daemon configuration: `config.toml`, loaded into plain dataclasses.

Paths in the file are relative to the file itself, so a config folder can be moved or
copied as a whole (the demo relies on this). Every value a user can get wrong is checked
here, with the key and the allowed range in the message.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from daemon.presets import PRESET_KEYS, check_preset


class ConfigError(ValueError):
    """config.toml is unreadable or holds a bad value; the message says where and how to fix."""


@dataclass(frozen=True)
class Paths:
    jobs: Path
    loras: Path
    models: Path
    inputs: Path
    outputs: Path
    state: Path
    wildcards: Path = Path("wildcards")  # __name__ in prompts reads wildcards/name.txt
    extra_inputs: tuple[Path, ...] = ()  # more folders a job's `image` may come from
    # Existing UI installs whose models and LoRAs are indexed in place, never modified.
    comfyui: tuple[Path, ...] = ()
    a1111: tuple[Path, ...] = ()
    embeddings: Path | None = None  # textual-inversion embeddings (None: none of our own)

    @property
    def checkpoint_folders(self) -> tuple[Path, ...]:
        """models/, then ComfyUI's checkpoints, diffusion_models and unet folders, then
        A1111/Forge's Stable-diffusion folder."""
        folders = [self.models]
        for root in self.comfyui:
            folders += [root / "models" / name for name in
                        ("checkpoints", "diffusion_models", "unet")]
        folders += [root / "models" / "Stable-diffusion" for root in self.a1111]
        return tuple(folders)

    @property
    def component_folders(self) -> dict[str, tuple[Path, ...]]:
        """Where the UI trees keep pipeline parts as separate files, by kind
        ("text_encoders", "vae"): ComfyUI's models/text_encoders (and its older name
        models/clip) and models/vae, Forge's models/text_encoder and models/VAE."""
        return {
            "text_encoders": (*(root / "models" / name for root in self.comfyui
                                for name in ("text_encoders", "clip")),
                              *(root / "models" / "text_encoder" for root in self.a1111)),
            "vae": (*(root / "models" / "vae" for root in self.comfyui),
                    *(root / "models" / "VAE" for root in self.a1111)),
        }

    @property
    def embedding_folders(self) -> tuple[Path, ...]:
        """embeddings/, then ComfyUI's models/embeddings and A1111's embeddings/ (read in
        place)."""
        own = (self.embeddings,) if self.embeddings is not None else ()
        return (*own, *(root / "models" / "embeddings" for root in self.comfyui),
                *(root / "embeddings" for root in self.a1111))

    @property
    def lora_folders(self) -> tuple[Path, ...]:
        return (self.loras, *(root / "models" / "loras" for root in self.comfyui),
                *(root / "models" / "Lora" for root in self.a1111))

    @property
    def input_roots(self) -> tuple[Path, ...]:
        return (self.inputs, *self.extra_inputs)

    @property
    def database(self) -> Path:
        return self.state / "lorafarm.sqlite"


@dataclass(frozen=True)
class Limits:
    """Upper bounds a single job may ask for; a job beyond them is rejected at intake."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_count: int = 100
    max_frames: int = 257


@dataclass(frozen=True)
class IntakeSettings:
    # A file whose size and mtime stayed still this long counts as complete.
    settle_seconds: float = 1.0
    # A young file that fails to parse is retried for this long before it is rejected
    # (its writer may still be busy with it).
    retry_young_seconds: float = 5.0
    # Watcher events are only hints: the folder is rescanned this often anyway.
    rescan_seconds: float = 10.0


@dataclass(frozen=True)
class WorkerSettings:
    device: str = "auto"  # "auto" = cuda when present, else cpu; or "cpu", "cuda", "cuda:1"
    # One worker per entry, e.g. ["cuda:0", "cuda:1"]; empty: one worker on `device`.
    devices: tuple[str, ...] = ()
    # Memory of the device a worker renders on (VRAM; RAM on the CPU) that its loaded
    # weights, as the offload mode leaves them there, plus a batch may use: batches are sized
    # by it and the least recently used pipelines leave the device to keep within it.
    # 0 = no limit.
    vram_budget_gb: float = 0.0
    # CPU RAM for pipelines moved off the GPU to make room (brought back by a move, not a
    # load from disk); 0 = none kept (they are unloaded). No effect on a CPU worker.
    ram_budget_gb: float = 0.0
    # How much of a pipeline lives in accelerator memory: none (all of it), model (diffusers
    # model CPU offload), group (group offload), sequential (layer by layer; slowest).
    offload: str = "none"
    max_wait_seconds: float = 1800.0  # no render waits longer behind loaded-model work
    dtype: str = "auto"  # "auto" = fp16 on cuda, fp32 on cpu; or float32, float16, bfloat16
    max_batch: int = 4  # renders per pipeline call at most
    max_attempts: int = 3  # a render whose attempts all died ends failed
    pipelines_in_memory: int = 2  # loaded checkpoints kept (least recently used goes first)


@dataclass(frozen=True)
class DeviceMemory:
    """The memory settings one worker's device runs under: [worker]'s, with a
    `[devices."cuda:1"]` table's on top for that device (cards of different sizes)."""

    vram_budget_gb: float = 0.0
    ram_budget_gb: float = 0.0
    offload: str = "none"


DEVICE_KEYS = tuple(f.name for f in fields(DeviceMemory))


@dataclass(frozen=True)
class WebSettings:
    """The status page and /metrics, served by the daemon."""

    enabled: bool = True
    host: str = "127.0.0.1"  # any other bind needs a token
    port: int = 8765
    token: str = ""  # required (as ?token= or a Bearer header) when host is not loopback


@dataclass(frozen=True)
class ReportSettings:
    """The morning report written to outputs/ when the queue drains."""

    enabled: bool = True
    webhook_url: str = ""  # optional: a generic JSON POST when the queue drains


WEBHOOK_EVENTS = ("job_accepted", "render_done", "render_failed", "job_finished",
                  "queue_drained")
WEBHOOK_KEYS = ("url", "events", "headers", "timeout_seconds", "retries", "backoff_seconds")


@dataclass(frozen=True)
class WebhookSettings:
    """One `[[webhooks]]` table: a JSON POST to `url` for each of `events`."""

    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    headers: tuple[tuple[str, str], ...] = ()  # e.g. an Authorization header for the receiver
    timeout_seconds: float = 5.0  # per attempt
    retries: int = 5  # attempts after the first, each after a longer wait
    backoff_seconds: float = 2.0  # the first wait; it doubles each retry (at most 5 minutes)


@dataclass(frozen=True)
class CheckpointOverride:
    """Per-checkpoint settings the header cannot tell (config.toml `[checkpoints.NAME]`)."""

    family: str | None = None
    lineage: str | None = None
    config: Path | None = None  # a diffusers config folder for single-file loading
    variant: str | None = None  # what the file cannot tell, e.g. Klein "base" / "distilled"
    # A GGUF pair's second (low-noise) expert file (Wan 2.2 A14B), as in a sidecar. A bare
    # file name stays relative: the registry looks for it beside the checkpoint; a path is
    # resolved against config.toml's folder.
    transformer_2: Path | None = None
    # Pipeline parts kept as files of their own, as ComfyUI users have them (clip_l,
    # t5xxl_fp16, ae.safetensors); each replaces that component's weights from `config`.
    # A bare file name (no folder) stays relative here: the registry looks it up in the
    # UI trees' component folders (Paths.component_folders); a path is resolved.
    text_encoder: Path | None = None
    text_encoder_2: Path | None = None
    vae: Path | None = None
    # Defaults for the jobs that use this checkpoint (daemon/presets.py): a job's own value
    # wins, the family default comes last.
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None


# Checkpoint keys naming component files, and the kind of UI folder each is looked up in.
COMPONENT_KEYS = {"text_encoder": "text_encoders", "text_encoder_2": "text_encoders",
                  "vae": "vae"}


def component_path(value: object, base: Path, where: str, key: str) -> Path:
    """A component key's value: a bare file name kept as is (looked up in the UI trees'
    folders later), anything else resolved against `base`. Raises ConfigError."""
    if not isinstance(value, str) or not value.strip():
        short = key.rsplit(".", 1)[-1]
        example = {"text_encoder_2": "t5xxl_fp16.safetensors",
                   "vae": "ae.safetensors"}.get(short, "clip_l.safetensors")
        raise ConfigError(f'{where}: {key} must be a file name or path, e.g. '
                          f'{short} = "{example}"')
    path = Path(value)
    return path if path.name == value else (base / path).resolve()


@dataclass(frozen=True)
class LoraOverride:
    """Per-LoRA settings (config.toml `[loras.NAME]`); a sidecar NAME.toml works the same."""

    family: str | None = None
    lineage: str | None = None


@dataclass(frozen=True)
class PostprocessStep:
    """One link of config.toml's `[[postprocess]]` chain, run on every image in order.

    kind: "upscale" (image in, image out: the output replaces the PNG, metadata kept),
    "scores" (every label's number is recorded; the quality gate reads one of them) or
    "tags" (labels whose number reaches `threshold` are recorded as tags)."""

    model: Path
    kind: str
    labels: tuple[str, ...] = ()  # empty: the model's `labels` metadata, else score0, ...
    threshold: float = 0.35  # tags: the least confidence that counts as a tag
    min_score: float | None = None  # scores: the quality gate; None = no gate
    gate: str = "flag"  # below min_score: "flag" (record it) or "reseed" (render again, once)
    gate_on: str | None = None  # the label the gate reads (default: the first)


@dataclass(frozen=True)
class Config:
    source: Path | None
    paths: Paths
    limits: Limits = field(default_factory=Limits)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    web: WebSettings = field(default_factory=WebSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    checkpoints: dict[str, CheckpointOverride] = field(default_factory=dict)
    loras: dict[str, LoraOverride] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # extra plugin modules to load by import name
    database_url_setting: str = ""  # config.toml `database_url`; "" = SQLite under state/
    # PostgreSQL connections one daemon keeps at most (0: SQLAlchemy's default, 5 kept plus
    # 10 more at peaks); a farm of many hosts lowers it to stay under max_connections.
    database_pool_size: int = 0
    # A running render's lease: a daemon that has not heartbeat for this long has lost its
    # renders to the queue (several daemons on one database).
    lease_seconds: float = 120.0
    # A host dead (stopped, or silent) this long leaves `lorafarm hosts` and the hosts table.
    forget_hosts_after_seconds: float = 86400.0
    postprocess: tuple[PostprocessStep, ...] = ()  # config.toml `[[postprocess]]`, in order
    # `[devices."cuda:1"]`: memory settings for one device, over [worker]'s.
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    webhooks: tuple[WebhookSettings, ...] = ()  # config.toml `[[webhooks]]`

    def memory_for(self, device: str) -> DeviceMemory:
        """The memory settings of the worker on `device` (as configured: "cuda:1", "auto")."""
        own = self.devices.get(device, {})
        return DeviceMemory(**{key: own.get(key, getattr(self.worker, key))
                               for key in DEVICE_KEYS})

    @property
    def database_url(self) -> str:
        """LORAFARM_DATABASE_URL, else config.toml `database_url`, else SQLite in state/."""
        url = os.environ.get("LORAFARM_DATABASE_URL") or self.database_url_setting
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url or f"sqlite:///{self.paths.database}"

    @property
    def worker_devices(self) -> tuple[str, ...]:
        return self.worker.devices or (self.worker.device,)

    def ensure_folders(self) -> None:
        for path in (self.paths.jobs, self.paths.loras, self.paths.models, self.paths.inputs,
                     self.paths.outputs, self.paths.state):
            path.mkdir(parents=True, exist_ok=True)
        # The database and state hold prompts: keep them to the user.
        os.chmod(self.paths.state, 0o700)


OFFLOAD_MODES = ("none", "model", "group", "sequential")
POSTPROCESS_KINDS = ("upscale", "scores", "tags")
POSTPROCESS_GATES = ("flag", "reseed")
POSTPROCESS_KEYS = ("model", "kind", "labels", "threshold", "min_score", "gate", "gate_on")
PATH_KEYS = ("jobs", "loras", "models", "inputs", "outputs", "state", "wildcards")
TOP_KEYS = ("paths", "limits", "intake", "worker", "web", "report", "checkpoints", "loras",
            "plugins", "database_url", "lease_seconds", "forget_hosts_after_seconds",
            "postprocess", "devices", "webhooks", "database_pool_size")


def load_config(path: Path) -> Config:
    """Read config.toml; relative paths resolve against the file's folder."""
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from exc
    return config_from_dict(data, base=path.parent, source=path)


def _second_expert_path(value: object, base: Path, where: str, name: str) -> Path | None:
    """`[checkpoints.NAME] transformer_2`: a .gguf file name (kept relative, found beside the
    checkpoint by the registry) or path (resolved against `base`). Whether the file exists is
    the registry's to check: a missing file makes that checkpoint unusable, not the config.
    Raises ConfigError."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip().lower().endswith(".gguf"):
        raise ConfigError(f"{where}: checkpoints.{name}.transformer_2 = {value!r}: it must name "
                          "the low-noise expert's .gguf file, e.g. transformer_2 = "
                          '"wan2.2_t2v_low_noise_14B_Q8_0.gguf" (beside the checkpoint) or a '
                          "path relative to this file")
    path = Path(value.strip())
    return path if path.name == value.strip() else (base / path).resolve()


def config_from_dict(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    where = str(source) if source else "config"
    _reject_unknown(data, TOP_KEYS, where, "")
    raw_paths = data.get("paths", {})
    _reject_unknown(raw_paths, (*PATH_KEYS, "extra_inputs", "comfyui", "a1111", "embeddings"),
                    where, "paths.")
    resolved = {key: (base / str(raw_paths.get(key, key))).resolve() for key in PATH_KEYS}
    extra = raw_paths.get("extra_inputs", [])
    if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
        raise ConfigError(f'{where}: paths.extra_inputs must be a list of folders, e.g. '
                          '["/data/start-frames"]')
    trees: dict[str, tuple[Path, ...]] = {}
    for key in ("comfyui", "a1111"):
        roots = raw_paths.get(key, [])
        if not isinstance(roots, list) or not all(isinstance(p, str) for p in roots):
            example = "ComfyUI" if key == "comfyui" else "stable-diffusion-webui"
            raise ConfigError(f'{where}: paths.{key} must be a list of install folders, e.g. '
                              f'["/home/me/{example}"]')
        trees[key] = tuple((base / p).resolve() for p in roots)
    embeddings = (base / str(raw_paths.get("embeddings", "embeddings"))).resolve()
    paths = Paths(**resolved, extra_inputs=tuple((base / p).resolve() for p in extra), **trees,
                  embeddings=embeddings)

    limits = _section(Limits, data.get("limits", {}), where, "limits")
    intake = _section(IntakeSettings, data.get("intake", {}), where, "intake")
    if isinstance(data.get("worker"), dict) and "memory_budget_gb" in data["worker"]:
        raise ConfigError(f"{where}: worker.memory_budget_gb was renamed: use vram_budget_gb "
                          "(the device memory for the loaded weights plus a batch)")
    worker = _section(WorkerSettings, data.get("worker", {}), where, "worker")
    web = _section(WebSettings, data.get("web", {}), where, "web")
    report = _section(ReportSettings, data.get("report", {}), where, "report")
    if web.enabled and web.host not in ("127.0.0.1", "localhost", "::1") and not web.token:
        raise ConfigError(f"{where}: [web] host = {web.host!r} exposes the status page beyond "
                          "this machine; set [web] token = \"a long random string\" too")
    if worker.offload not in OFFLOAD_MODES:
        raise ConfigError(f"{where}: worker.offload = {worker.offload!r}; use one of "
                          f"{', '.join(OFFLOAD_MODES)}")
    if worker.vram_budget_gb < 0 or worker.ram_budget_gb < 0:
        raise ConfigError(f"{where}: [worker] vram_budget_gb and ram_budget_gb must be 0 (no "
                          "limit / no RAM tier) or a number of gigabytes, e.g. "
                          "vram_budget_gb = 22.0")
    if worker.max_batch < 1 or worker.max_attempts < 1 or worker.pipelines_in_memory < 1:
        raise ConfigError(f"{where}: [worker] max_batch, max_attempts and pipelines_in_memory "
                          "must each be at least 1")

    checkpoints: dict[str, CheckpointOverride] = {}
    for name, table in data.get("checkpoints", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [checkpoints.{name}] must be a table, e.g. "
                              f'[checkpoints.{name}]\\nfamily = "sdxl"')
        _reject_unknown(table, ("family", "lineage", "config", "variant", "transformer_2",
                                *COMPONENT_KEYS, *PRESET_KEYS), where, f"checkpoints.{name}.")
        try:
            preset = check_preset(table, f"{where}: [checkpoints.{name}]")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        config_dir = table.get("config")
        checkpoints[name] = CheckpointOverride(
            family=table.get("family"),
            lineage=table.get("lineage"),
            config=(base / config_dir).resolve() if config_dir else None,
            variant=table.get("variant"),
            transformer_2=_second_expert_path(table.get("transformer_2"), base, where, name),
            **{key: component_path(table[key], base, where, f"checkpoints.{name}.{key}")
               for key in COMPONENT_KEYS if key in table},
            **preset,
        )
    loras: dict[str, LoraOverride] = {}
    for name, table in data.get("loras", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f'{where}: [loras.{name}] must be a table, e.g. lineage = "pony"')
        _reject_unknown(table, ("family", "lineage"), where, f"loras.{name}.")
        loras[name] = LoraOverride(family=table.get("family"), lineage=table.get("lineage"))
    database_url = data.get("database_url", "")
    if not isinstance(database_url, str) or (database_url and not database_url.startswith(
            ("sqlite:", "postgresql:", "postgresql+psycopg:"))):
        raise ConfigError(f"{where}: database_url must be a postgresql://user@host/db or "
                          "sqlite:///path URL (empty: SQLite under state/)")
    pool_size = data.get("database_pool_size", 0)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0 \
            or pool_size == 1:
        raise ConfigError(f"{where}: database_pool_size must be 0 (the default pool) or a whole "
                          f"number of connections >= 2, got {pool_size!r}")
    lease = data.get("lease_seconds", 120)
    if isinstance(lease, bool) or not isinstance(lease, int | float) or lease < 5:
        raise ConfigError(f"{where}: lease_seconds must be a number of seconds >= 5")
    forget_hosts = data.get("forget_hosts_after_seconds", 86400)
    if (isinstance(forget_hosts, bool) or not isinstance(forget_hosts, int | float)
            or forget_hosts <= 0):
        raise ConfigError(f"{where}: forget_hosts_after_seconds must be a number of seconds "
                          "> 0, e.g. forget_hosts_after_seconds = 86400 (a day)")
    plugins = data.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f'{where}: plugins must be a list of module names, e.g. ["my_plugin"]')
    postprocess = _postprocess_chain(data.get("postprocess", []), base, where)
    return Config(source=source, paths=paths, limits=limits, intake=intake, worker=worker,
                  web=web, report=report,
                  checkpoints=checkpoints, loras=loras, plugins=tuple(plugins),
                  database_url_setting=database_url, database_pool_size=pool_size,
                  lease_seconds=float(lease),
                  forget_hosts_after_seconds=float(forget_hosts),
                  postprocess=postprocess,
                  devices=_device_tables(data.get("devices", {}), worker, where),
                  webhooks=_webhooks(data.get("webhooks", []), where))


def _webhooks(raw: Any, where: str) -> tuple[WebhookSettings, ...]:
    """`[[webhooks]]` tables, each checked key by key."""
    example = ('[[webhooks]]\nurl = "https://chat.example/hooks/renders"\n'
               'events = ["job_finished", "render_failed"]')
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: webhooks must be a list of tables, e.g. {example}")
    hooks = []
    for number, table in enumerate(raw, start=1):
        name = f"webhooks[{number}]"
        _reject_unknown(table, WEBHOOK_KEYS, where, f"{name}.")
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {name}.url must be an http:// or https:// URL, got "
                              f"{url!r}, e.g. {example}")
        events = table.get("events", list(WEBHOOK_EVENTS))
        if not isinstance(events, list) or not events or not all(
                isinstance(e, str) for e in events):
            raise ConfigError(f"{where}: {name}.events must be a list of event names (leave "
                              f"it out for all of them): {', '.join(WEBHOOK_EVENTS)}")
        for event in events:
            if event not in WEBHOOK_EVENTS:
                close = difflib.get_close_matches(event, WEBHOOK_EVENTS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"{where}: {name}.events: unknown event {event!r}; {hint}"
                                  f"known: {', '.join(WEBHOOK_EVENTS)}")
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ConfigError(f'{where}: {name}.headers must be a table of strings, e.g. '
                              f'headers = {{ Authorization = "Bearer ..." }}')
        numbers: dict[str, float] = {}
        for key, default, least in (("timeout_seconds", 5.0, 0.1), ("retries", 5, 0),
                                    ("backoff_seconds", 2.0, 0.0)):
            value = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < least \
                    or (key == "retries" and not isinstance(value, int)):
                kind = "a whole number" if key == "retries" else "a number of seconds"
                raise ConfigError(f"{where}: {name}.{key} must be {kind} >= {least}, got "
                                  f"{value!r}")
            numbers[key] = value
        hooks.append(WebhookSettings(
            url=url, events=tuple(dict.fromkeys(events)), headers=tuple(headers.items()),
            timeout_seconds=float(numbers["timeout_seconds"]), retries=int(numbers["retries"]),
            backoff_seconds=float(numbers["backoff_seconds"])))
    return tuple(hooks)


def _device_tables(raw: Any, worker: WorkerSettings, where: str) -> dict[str, dict[str, Any]]:
    """`[devices."cuda:1"]` tables: vram_budget_gb, ram_budget_gb and offload for one of the
    workers' devices, checked as [worker]'s own keys are."""
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: devices must hold tables, e.g. [devices."cuda:1"]\n'
                          "vram_budget_gb = 10.0")
    used = worker.devices or (worker.device,)
    tables: dict[str, dict[str, Any]] = {}
    for device, table in raw.items():
        if device not in used:
            raise ConfigError(f'{where}: [devices."{device}"] names a device no worker renders '
                              f"on (workers: {', '.join(used)}); add it to worker.devices or "
                              "fix the name")
        if not isinstance(table, dict):
            raise ConfigError(f'{where}: [devices."{device}"] must be a table')
        checked = _section(DeviceMemory, table, where, f'devices."{device}"')
        if checked.offload not in OFFLOAD_MODES:
            raise ConfigError(f'{where}: devices."{device}".offload = {checked.offload!r}; use '
                              f"one of {', '.join(OFFLOAD_MODES)}")
        tables[device] = {key: getattr(checked, key) for key in table}
    return tables


def _postprocess_chain(raw: Any, base: Path, where: str) -> tuple[PostprocessStep, ...]:
    """`[[postprocess]]` tables, in file order. The model files are not opened here: the
    history commands read this config too and must work while a model is being replaced."""
    example = '[[postprocess]]\nmodel = "models/onnx/upscale.onnx"\nkind = "upscale"'
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: postprocess must be a list of tables, e.g. {example}")
    steps = []
    for number, table in enumerate(raw, start=1):
        name = f"postprocess[{number}]"
        _reject_unknown(table, POSTPROCESS_KEYS, where, f"{name}.")
        model, kind = table.get("model"), table.get("kind")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: {name}.model must name a model file, e.g. {example}")
        if kind not in POSTPROCESS_KINDS:
            raise ConfigError(f"{where}: {name}.kind = {kind!r}; use one of "
                              f"{', '.join(POSTPROCESS_KINDS)}")
        labels = table.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f'{where}: {name}.labels must be a list of names, e.g. '
                              '["aesthetic"]')
        numbers: dict[str, float | None] = {}
        for key, default in (("threshold", 0.35), ("min_score", None)):
            value = table.get(key, default)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise ConfigError(f"{where}: {name}.{key} must be a number, got {value!r}")
            numbers[key] = None if value is None else float(value)
        gate = table.get("gate", "flag")
        if gate not in POSTPROCESS_GATES:
            raise ConfigError(f"{where}: {name}.gate = {gate!r}; use one of "
                              f"{', '.join(POSTPROCESS_GATES)}")
        gate_on = table.get("gate_on")
        if gate_on is not None and (not isinstance(gate_on, str) or
                                    (labels and gate_on not in labels)):
            raise ConfigError(f"{where}: {name}.gate_on = {gate_on!r} must be one of its "
                              f"labels ({', '.join(labels) or 'none given'})")
        if kind != "scores" and ("min_score" in table or "gate" in table):
            raise ConfigError(f'{where}: {name}: min_score and gate apply to kind = "scores" '
                              f"steps only, this one is kind = {kind!r}")
        steps.append(PostprocessStep(
            model=(base / model).resolve(), kind=kind, labels=tuple(labels),
            threshold=float(numbers["threshold"] or 0.0), min_score=numbers["min_score"],
            gate=gate, gate_on=gate_on))
    return tuple(steps)


def _section(cls: type, table: Any, where: str, name: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    allowed = {f.name: f for f in fields(cls)}
    _reject_unknown(table, tuple(allowed), where, f"{name}.")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = allowed[key].default
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is tuple and isinstance(value, list) and all(isinstance(v, str)
                                                                  for v in value):
            value = tuple(value)
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool):
            raise ConfigError(f"{where}: {name}.{key} must be a {expected.__name__} "
                              f"(default {default!r}), got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{where}: {name}.{key} must not be negative, got {value!r}")
        values[key] = value
    return cls(**values)


def _reject_unknown(table: dict[str, Any], allowed: tuple[str, ...], where: str,
                    prefix: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else \
                f"; allowed: {', '.join(prefix + a for a in allowed)}"
            raise ConfigError(f"{where}: unknown setting {prefix}{key}{hint}")
