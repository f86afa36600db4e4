"""The plan: plain data saying which attention method each site (layer) and head uses.

    Plan(sites={site_name: SitePlan(heads=(HeadSpec(method, params), ...))}, fingerprint=...)

A `SitePlan` with ONE head spec applies it to every head of the site (the compact form); otherwise it has
one spec per query head. Sites the plan does not mention keep their original attention. The optional
`ModelFingerprint` records the model's sites (name, heads, KV heads, head_dim), and for calibrated plans
its architecture and a hash of its attention weights, so a plan made for one model is refused on another. Plans round-trip through JSON and are checked against a model's sites with
`validate`, which also checks every head's parameters with the method registry.

Example:
    >>> sites = [SiteInfo(f"model.layers.{i}.self_attn", 8, 2, 64) for i in range(4)]
    >>> plan = Plan.uniform(sites, "streaming", window=256).dense_layers(first=1)
    >>> plan.resolve("model.layers.0.self_attn")[0].method
    'dense'
    >>> Plan.from_json(plan.to_json()) == plan
    True
    >>> plan.validate(sites)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcpass.methods import get_method, resolve_params, site_mask_mod

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SiteInfo:
    """What the detector knows about one attention site (any object with these attributes works)."""

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    is_causal: bool | None = None  # None = unknown; False = bidirectional (causal-only methods refused)

    @staticmethod
    def of(obj: Any) -> "SiteInfo":
        """Copy the attributes from any site-like object (``is_causal`` optional)."""
        try:
            causal = getattr(obj, "is_causal", None)
            return SiteInfo(
                str(obj.name), int(obj.n_heads), int(obj.n_kv_heads), int(obj.head_dim),
                None if causal is None else bool(causal),
            )
        except AttributeError as e:
            raise TypeError(
                f"{obj!r} is not a site description: it needs name, n_heads, n_kv_heads, head_dim ({e})"
            ) from None


@dataclass(frozen=True)
class HeadSpec:
    """One head's method and its parameters (only the ones given; defaults live in the registry)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted(self.params.items()))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"method": self.method, "params": dict(self.params)}


@dataclass(frozen=True)
class SitePlan:
    """The heads of one site: one spec (all heads the same) or one spec per query head."""

    heads: tuple[HeadSpec, ...]

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("SitePlan needs at least one head spec; use one spec for 'all heads the same'")
        object.__setattr__(self, "heads", tuple(self.heads))

    @staticmethod
    def same(method: str, **params: Any) -> "SitePlan":
        """Every head uses `method` with `params`."""
        return SitePlan((HeadSpec(method, dict(params)),))

    @property
    def uniform(self) -> bool:
        """True when the compact one-spec form is used."""
        return len(self.heads) == 1

    def resolve(self, n_heads: int) -> list[HeadSpec]:
        """One spec per head."""
        if self.uniform:
            return [self.heads[0]] * n_heads
        if len(self.heads) != n_heads:
            raise ValueError(f"site plan has {len(self.heads)} head specs, the site has {n_heads} heads")
        return list(self.heads)


@dataclass(frozen=True)
class ModelFingerprint:
    """The model a plan was made for: its attention sites in model order, and optionally its
    architecture (class name) and a hash of its attention weights (`attention_weights_hash`).

    A plan whose fingerprint has ``weights`` is refused on a model whose attention weights differ (a
    calibrated plan is only right for the weights it was calibrated on); empty fields are not compared.
    """

    sites: tuple[SiteInfo, ...]
    model: str = ""
    architecture: str = ""
    weights: str = ""

    @staticmethod
    def from_sites(sites: Iterable[Any], model: str = "") -> "ModelFingerprint":
        """Fingerprint of a site list (`SiteInfo` or any object with its attributes)."""
        return ModelFingerprint(tuple(SiteInfo.of(s) for s in sites), model)

    @staticmethod
    def of_model(model: Any, sites: Iterable[Any], name: str = "") -> "ModelFingerprint":
        """Full fingerprint of `model` with its detected `sites`: sites, architecture, weight hash.

        Example:
            >>> fp = ModelFingerprint.of_model(model, sites, "SmolLM2-135M")  # doctest: +SKIP
            >>> fp.architecture, len(fp.weights)                             # doctest: +SKIP
            ('LlamaForCausalLM', 16)
        """
        infos = tuple(SiteInfo.of(s) for s in sites)
        return ModelFingerprint(
            infos, name, type(model).__name__, attention_weights_hash(model, [s.name for s in infos])
        )

    def first_mismatch(self, sites: "Sequence[SiteInfo] | ModelFingerprint") -> str | None:
        """A sentence describing the first difference from `sites` (a site list or another
        fingerprint: then architecture and attention weights are compared too), or None when they match."""
        other = sites if isinstance(sites, ModelFingerprint) else None
        site_list: Sequence[SiteInfo] = other.sites if other is not None else sites  # type: ignore[assignment]
        if other is not None and self.architecture and other.architecture:
            if self.architecture != other.architecture:
                return f"architecture is {self.architecture} in the plan but {other.architecture} in the model"
        for i, (mine, theirs) in enumerate(zip(self.sites, site_list)):
            if mine.name != theirs.name:
                return f"site #{i} is {mine.name!r} in the plan but {theirs.name!r} in the model"
            for attr in ("n_heads", "n_kv_heads", "head_dim", "is_causal"):
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a != b and a is not None and b is not None:
                    return f"site {mine.name!r}: {attr} is {a} in the plan but {b} in the model"
        if len(self.sites) != len(site_list):
            return f"the plan's model has {len(self.sites)} attention sites, this model has {len(site_list)}"
        if other is not None and self.weights and other.weights and self.weights != other.weights:
            return (
                f"the attention weights differ (hash {self.weights} in the plan, {other.weights} in the "
                f"model), so the plan was calibrated on other weights"
            )
        return None


def attention_weights_hash(model: Any, site_names: Sequence[str]) -> str:
    """A 16-hex-digit SHA-256 of the parameters under each attention site's module (model order).

    Sites whose name is not a submodule of `model` contribute their name only.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in site_names:
        h.update(name.encode())
        try:
            module = model.get_submodule(name)
        except (AttributeError, TypeError):
            continue
        for pname, p in module.named_parameters():
            h.update(pname.encode())
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _site_list(sites_or_model: Any) -> list[SiteInfo]:
    if hasattr(sites_or_model, "sites") and not isinstance(sites_or_model, ModelFingerprint):
        sites_or_model = sites_or_model.sites
    elif isinstance(sites_or_model, ModelFingerprint):
        sites_or_model = sites_or_model.sites
    if isinstance(sites_or_model, Mapping):
        sites_or_model = list(sites_or_model.values())
    if isinstance(sites_or_model, (str, bytes)) or not isinstance(sites_or_model, Iterable):
        raise TypeError(
            f"{type(sites_or_model).__name__} is not a site list; pass the detector's sites (objects "
            f"with name, n_heads, n_kv_heads, head_dim) or anything with a .sites list"
        )
    out = [SiteInfo.of(s) for s in sites_or_model]
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"site names must be unique; repeated: {dup}")
    return out


@dataclass(frozen=True)
class Plan:
    """Site name -> `SitePlan`, plus the fingerprint of the model it was made for (or None)."""

    sites: Mapping[str, SitePlan]
    fingerprint: ModelFingerprint | None = None

    # -- what a door asks for ---------------------------------------------------------------------
    @classmethod
    def request(cls, method: str | None, plan: "Plan | PlanRequest | str | Path | None",
                params: Mapping[str, Any] | None = None, *, door: str,
                method_flag: str = "method='name' (see `lcpass methods`)", plan_flag: str = "plan=...",
                dense_first: int = 0, dense_last: int = 0, own_options: Sequence[str] = ()) -> "PlanRequest":
        """Check a door's arguments once, before any capture: exactly one of ``method`` / ``plan``; the
        method known and its parameters valid; no parameters with a plan; a plan path loaded. Errors name
        the door and the fix (``door``, ``method_flag`` and ``plan_flag`` spell them as that door's
        caller writes them; ``own_options`` lists the door's own option names, for a door whose method
        parameters share one mapping with them). A :class:`PlanRequest` passed as ``plan`` was checked already: it is
        returned as it is."""
        params = dict(params or {})
        if isinstance(plan, PlanRequest) and method is None and not params:
            return plan
        for name, value in (("dense_first", dense_first), ("dense_last", dense_last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{door}: {name}={value!r} must be an int >= 0")
        if (method is None) == (plan is None):
            raise ValueError(f"{door}: pass exactly one of {method_flag} or {plan_flag}")
        if method is not None:
            if not isinstance(method, str):
                raise ValueError(f"{door}: method must be a method name (see `lcpass methods`), not "
                                 f"{type(method).__name__}")
            resolve_params(get_method(method), params)  # unknown method / parameter -> ValueError
            return PlanRequest(method, None, params, dense_first, dense_last)
        if params:
            own = f" (the door's own options are {', '.join(own_options)})" if own_options else ""
            raise ValueError(f"{door}: parameters {sorted(params)} go with {method_flag.split(' (')[0]}, "
                             f"not with {plan_flag.split(' (')[0]}{own}")
        if isinstance(plan, (str, Path)):
            plan = cls.load(plan)
        elif not isinstance(plan, Plan):
            raise ValueError(f"{door}: plan must be a Plan or a path to a plan JSON file, not {type(plan).__name__}")
        return PlanRequest(None, plan, {}, dense_first, dense_last)

    @classmethod
    def from_args(cls, sites_or_model: Any, method: str | None = None, plan: "Plan | str | Path | None" = None,
                  *, door: str = "lcpass", **params: Any) -> "Plan":
        """:meth:`request` and :meth:`PlanRequest.for_sites` in one step (the sites are known already).

        Example:
            >>> Plan.from_args([SiteInfo("l0", 2, 2, 8, True)], "dense").resolve("l0")[1].method
            'dense'
        """
        return cls.request(method, plan, params, door=door).for_sites(sites_or_model)

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, sites_or_model: Any, method: str, **params: Any) -> "Plan":
        """Every head of every site uses `method(**params)` (params checked now)."""
        resolve_params(get_method(method), params)
        sites = _site_list(sites_or_model)
        plan = {s.name: SitePlan.same(method, **params) for s in sites}
        return cls(plan, ModelFingerprint.from_sites(sites))

    @classmethod
    def duo(
        cls,
        sites_or_model: Any,
        retrieval: Mapping[str, Sequence[int]],
        sink: int = 64,
        recent: int = 256,
        by_kv_head: bool = False,
    ) -> "Plan":
        """DuoAttention: heads listed in `retrieval[site]` are retrieval heads, all others streaming.

        With `by_kv_head=True` the indices are KV heads (as DuoAttention's GQA patterns are published)
        and every query head of those KV groups becomes a retrieval head.

        Example:
            >>> p = Plan.duo([SiteInfo("l0", 4, 4, 8)], {"l0": [1]}, sink=4, recent=64)
            >>> [h.params["retrieval"] for h in p.resolve("l0")]
            [False, True, False, False]
        """
        sites = _site_list(sites_or_model)
        by_name = {s.name: s for s in sites}
        unit = "KV heads" if by_kv_head else "heads"
        chosen_by_site: dict[str, set[int]] = {}
        for name, heads in retrieval.items():
            if name not in by_name:
                raise ValueError(
                    f"Plan.duo: retrieval site {name!r} is not in the model; sites: {_names(by_name)}"
                )
            site = by_name[name]
            count = site.n_kv_heads if by_kv_head else site.n_heads
            bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < count]
            if bad:
                raise ValueError(
                    f"Plan.duo: site {name!r} has {count} {unit}; retrieval {unit} {bad} are out of range "
                    f"0..{count - 1}"
                )
            group = site.n_heads // site.n_kv_heads if by_kv_head else 1
            chosen_by_site[name] = {h * group + i for h in heads for i in range(group)}
        resolve_params(get_method("duo"), {"sink": sink, "recent": recent})
        plan: dict[str, SitePlan] = {}
        for s in sites:
            chosen = chosen_by_site.get(s.name, set())
            specs = [
                HeadSpec("duo", {"sink": sink, "recent": recent, "retrieval": h in chosen})
                for h in range(s.n_heads)
            ]
            plan[s.name] = SitePlan(tuple(specs)) if chosen else SitePlan((specs[0],))
        return cls(plan, ModelFingerprint.from_sites(sites))

    # -- modifiers (return new plans) -----------------------------------------------------------
    def _order(self) -> list[str]:
        if self.fingerprint is not None:
            return [s.name for s in self.fingerprint.sites]
        return list(self.sites)

    def dense_layers(self, first: int = 0, last: int = 0) -> "Plan":
        """Keep the first `first` and last `last` sites (model order) dense.

        Example:
            >>> sites = [SiteInfo(f"l{i}", 2, 2, 8) for i in range(4)]
            >>> p = Plan.uniform(sites, "causal").dense_layers(first=1, last=1)
            >>> [p.resolve(f"l{i}")[0].method for i in range(4)]
            ['dense', 'causal', 'causal', 'dense']
        """
        for name, value in (("first", first), ("last", last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dense_layers: {name}={value!r} must be an int >= 0")
        order = self._order()
        chosen = set(order[:first]) | (set(order[len(order) - last :]) if last else set())
        sites = dict(self.sites)
        for name in order:
            if name in chosen:
                sites[name] = SitePlan.same("dense")
        return Plan(sites, self.fingerprint)

    def with_site(self, name: str, site: SitePlan | HeadSpec | Sequence[HeadSpec]) -> "Plan":
        """A copy with `name` planned as `site` (a SitePlan, one HeadSpec, or one spec per head)."""
        if isinstance(site, HeadSpec):
            site = SitePlan((site,))
        elif not isinstance(site, SitePlan):
            site = SitePlan(tuple(site))
        return Plan({**self.sites, name: site}, self.fingerprint)

    # -- queries ---------------------------------------------------------------------------------
    def resolve(self, site_name: str, n_heads: int | None = None) -> list[HeadSpec]:
        """Per-head specs of `site_name` (head count from `n_heads` or the fingerprint).

        A site the plan does not mention keeps its attention: every head gets ``HeadSpec("dense")``.
        Without a head count (no `n_heads`, no fingerprint) the compact form returns its one spec.
        """
        if n_heads is None and self.fingerprint is not None:
            n_heads = next((s.n_heads for s in self.fingerprint.sites if s.name == site_name), None)
        site = self.sites.get(site_name)
        if site is None:
            site = SitePlan.same("dense")
        if n_heads is None:
            if site.uniform:
                return [site.heads[0]]
            return list(site.heads)
        try:
            return site.resolve(n_heads)
        except ValueError as e:
            raise ValueError(f"plan site {site_name!r}: {e}") from None

    def validate(self, sites_or_model: Any) -> None:
        """Check the plan against a model's sites; ValueError naming the site and the mismatch.

        Pass `ModelFingerprint.of_model(model, sites)` to compare architecture and attention weights too.

        Refuses: a fingerprint of another model (first difference named), a planned site the model
        lacks, a per-head list of the wrong length, unknown methods or bad parameters, and methods
        that cannot run on the site (e.g. s2 with fewer heads than vert_stride).
        """
        sites = _site_list(sites_or_model)
        by_name = {s.name: s for s in sites}
        if self.fingerprint is not None:
            other = sites_or_model if isinstance(sites_or_model, ModelFingerprint) else sites
            why = self.fingerprint.first_mismatch(other)
            if why is not None:
                made_for = f" {self.fingerprint.model!r}" if self.fingerprint.model else " another model"
                raise ValueError(f"plan was made for{made_for}: {why}; make a new plan for this model")
        for name, site in self.sites.items():
            info = by_name.get(name)
            if info is None:
                raise ValueError(
                    f"plan site {name!r} is not in the model; the model's sites: {_names(by_name)}"
                )
            if not site.uniform and len(site.heads) != info.n_heads:
                raise ValueError(
                    f"plan site {name!r} lists {len(site.heads)} head specs but the site has {info.n_heads} "
                    f"heads; give one spec (all heads) or {info.n_heads}"
                )
            for h, spec in enumerate(site.heads):
                where = f"plan site {name!r}" + ("" if site.uniform else f" head {h}")
                try:
                    resolve_params(get_method(spec.method), spec.params)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            try:
                mask = site_mask_mod(site.heads, info.n_heads, _PROBE, _PROBE)
            except ValueError as e:
                raise ValueError(f"plan site {name!r}: {e}") from None
            if info.is_causal is False:
                blind = [h for h, sees in enumerate(_sees_future(mask, info.n_heads)) if not sees]
                if blind:
                    spec = site.resolve(info.n_heads)[blind[0]]
                    raise ValueError(
                        f"plan site {name!r} is bidirectional (is_causal=False) but heads {blind} use causal "
                        f"plans (e.g. {spec.method!r}) that would hide later tokens; plan them 'dense' or "
                        f"with a non-causal method"
                    )

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (see `from_dict`)."""
        fp = None
        if self.fingerprint is not None:
            fp = {
                "model": self.fingerprint.model,
                "sites": [_site_dict(s) for s in self.fingerprint.sites],
            }
            if self.fingerprint.architecture:
                fp["architecture"] = self.fingerprint.architecture
            if self.fingerprint.weights:
                fp["weights"] = self.fingerprint.weights
        sites: dict[str, Any] = {}
        for name, site in self.sites.items():
            if site.uniform:
                sites[name] = {"all": site.heads[0].to_dict()}
            else:
                sites[name] = {"heads": [h.to_dict() for h in site.heads]}
        return {"lcpass_plan": FORMAT_VERSION, "fingerprint": fp, "sites": sites}

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """Inverse of `to_dict`; ValueError naming the offending entry."""
        if not isinstance(data, Mapping) or "sites" not in data:
            raise ValueError("not an lcpass plan: expected an object with 'lcpass_plan' and 'sites'")
        version = data.get("lcpass_plan")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"plan format version {version!r} is not supported; this lcpass reads {FORMAT_VERSION}"
            )
        if not isinstance(data["sites"], Mapping):
            raise ValueError("plan 'sites' must be an object mapping site names to site plans")
        sites: dict[str, SitePlan] = {}
        for name, entry in data["sites"].items():
            where = f"sites[{name!r}]"
            if isinstance(entry, Mapping) and "all" in entry:
                sites[name] = SitePlan((_head_from(entry["all"], f"{where}.all"),))
            elif isinstance(entry, Mapping) and isinstance(entry.get("heads"), list) and entry["heads"]:
                heads = [_head_from(h, f"{where}.heads[{i}]") for i, h in enumerate(entry["heads"])]
                sites[name] = SitePlan(tuple(heads))
            else:
                raise ValueError(
                    f"plan {where} must be {{'all': spec}} or {{'heads': [spec, ...]}}, got {entry!r}"
                )
        fp = data.get("fingerprint")
        fingerprint = None
        if fp is not None:
            try:
                fp_sites = tuple(_site_from(s) for s in fp["sites"])
                fingerprint = ModelFingerprint(
                    fp_sites, str(fp.get("model", "")), str(fp.get("architecture", "")),
                    str(fp.get("weights", "")),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"plan fingerprint is malformed ({type(e).__name__}: {e})") from None
        return cls(sites, fingerprint)

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse JSON text written by `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON to `path`."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; FileNotFoundError / ValueError naming the file when missing or corrupt."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"plan file '{p}' does not exist; write one with Plan.save or check the path"
            )
        try:
            return cls.from_json(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"plan file '{p}' is not a valid lcpass plan: {e}") from None


@dataclass(frozen=True)
class PlanRequest:
    """What a door was asked for: one method with its parameters, or one plan; checked once, before
    capture, by :meth:`Plan.request`, and turned into a validated plan for the sites detection found by
    :meth:`for_sites`. Every door (``optimize``, the compile backend, ``export``, the CLI,
    all through :func:`lcpass.pipeline.compile_sites`) builds its plan this way.

    Example:
        >>> req = Plan.request("streaming", None, {"sink": 4, "window": 64}, door="lcpass.optimize")
        >>> req.for_sites([SiteInfo("l0", 2, 2, 8, True)]).resolve("l0")[0].method
        'streaming'
    """

    method: str | None
    plan: "Plan | None"
    params: Mapping[str, Any] = field(default_factory=dict)
    dense_first: int = 0  # a method's plan keeps the first / last sites dense (:meth:`Plan.dense_layers`)
    dense_last: int = 0

    def for_sites(self, sites_or_model: Any) -> "Plan":
        """The plan for these sites (a uniform one for a method), validated against them."""
        plan = self.plan if self.plan is not None else Plan.uniform(sites_or_model, self.method, **self.params)
        if self.dense_first or self.dense_last:
            plan = plan.dense_layers(first=self.dense_first, last=self.dense_last)
        plan.validate(sites_or_model)
        return plan


_PROBE = 32  # positions probed to tell a causal site plan from one that sees later tokens


def _sees_future(mask: Any, n_heads: int) -> list[bool]:
    """Per head: does `mask` let some query see a later key (probed on the first _PROBE positions)?"""
    import torch

    pos = torch.arange(_PROBE)
    h = torch.arange(n_heads)[:, None, None]
    allowed = mask(torch.zeros((), dtype=torch.long), h, pos[None, :, None], pos[None, None, :])
    future = allowed & (pos[None, None, :] > pos[None, :, None])
    return future.expand(n_heads, _PROBE, _PROBE).flatten(1).any(dim=1).tolist()


def _site_dict(s: SiteInfo) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": s.name, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "head_dim": s.head_dim,
    }
    if s.is_causal is not None:
        d["is_causal"] = s.is_causal
    return d


def _site_from(d: Mapping[str, Any]) -> SiteInfo:
    causal = d.get("is_causal")
    if causal is not None and not isinstance(causal, bool):
        raise ValueError(f"is_causal must be true, false or absent, got {causal!r}")
    return SiteInfo(str(d["name"]), int(d["n_heads"]), int(d["n_kv_heads"]), int(d["head_dim"]), causal)


def _head_from(obj: Any, where: str) -> HeadSpec:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("method"), str):
        raise ValueError(f"plan {where} must be {{'method': name, 'params': {{...}}}}, got {obj!r}")
    params = obj.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"plan {where}.params must be an object, got {params!r}")
    return HeadSpec(obj["method"], dict(params))


def _names(by_name: Mapping[str, Any], limit: int = 6) -> str:
    names = list(by_name)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"
