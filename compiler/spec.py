"""A conversion spec, validated: the compiler's input, as plain frozen data.

Every check a spec author could fail lives here, and each failure is a SpecError
naming the file, the line and what was expected, so the templates can assume a
well-formed spec.
"""

from __future__ import annotations

import hashlib
import keyword
import re
from dataclasses import dataclass
from pathlib import Path

from shardsync.compiler import _kinds
from shardsync.compiler.errors import SpecError
from shardsync.compiler.expressions import ExpressionError, condition, int_expression
from shardsync.compiler.kinds import KINDS, Kind
from shardsync.compiler.layouts import SIDES, LayoutError, placement
from shardsync.compiler.megatron import (MOE_FIELDS, NORMALIZATIONS, SECTION, Megatron, megatron_facts,
                                         missing_families)
from shardsync.compiler.yaml_lines import LineDict, load_yaml

TOP_LEVEL = {"family": True, "architectures": True, "config": True, "derived": False, "requires": False,
             "megatron": True, "params": True}
REQUIREMENT_FIELDS = {"value": True, "why": True}
PARAM_FIELDS = {"megatron": True, "hf": True, "vllm": False, "when": False, "stage": False, "experts": False,
                "split": False, "dims": False, "layout": False, "shape": False, "parts": False, "cols": False}
SHORTHAND_FIELDS = ("split", "dims")
COMPOSED_FIELDS = ("layout", "shape", "parts", "cols")
PART_FIELDS = {"count": True, "unit": False}
FUSED = "fused"
EXPERT_SHORTHANDS = ("replicated", "row", "column", "gated")
CONFIG_FIELDS = {"field": True, "type": False, "default": False}
CONFIG_TYPES = ("int", "bool", "float")
RESERVED = {"cfg", "hf", "layer", "make_vocab_size_divisible_by"}
STAGES = ("first", "last")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEGMENT = r"(?:[A-Za-z0-9_]+|\{layer\}|\{expert\})"
_TENSOR_NAME = re.compile(rf"^{_SEGMENT}(?:\.{_SEGMENT})*$")


@dataclass(frozen=True)
class ConfigEntry:
    """A name the layouts use, read from one HF config field."""

    name: str
    field: str
    type: str  # "int", "bool" or "float"
    default: str | None  # Python source of the default, over names defined earlier


@dataclass(frozen=True)
class Derived:
    name: str
    expression: str


@dataclass(frozen=True)
class Param:
    """One parameter family: its names on each side and how each side holds it.

    `family` is the composition itself (names still patterns over {layer}): the names
    and the stage are read from it. `kind` and `dims` say which shorthand built it, or
    are None and () for a composed family.
    """

    key: str
    when: tuple[str, bool] | None  # (flag, negated)
    family: _kinds.Family
    kind: Kind | None
    dims: tuple[tuple[str, str], ...]  # (dim of the shorthand, config name)

    @property
    def const_name(self) -> str:
        return self.key.upper()

    @property
    def megatron(self) -> str:
        return self.family.megatron

    @property
    def hf(self) -> tuple[tuple[str, str], ...]:
        """(part role, HF name) per part; role "" for a single part."""
        return tuple((part.role, part.hf) for part in self.family.parts)

    @property
    def vllm(self) -> tuple[str, ...] | None:
        """One name, one per part, or None: no vLLM layout table."""
        return self.family.vllm

    @property
    def stage(self) -> str:
        """"layer", "first" or "last"."""
        return self.family.stage


@dataclass(frozen=True)
class Requirement:
    """An HF field these converters serve at one value only (absent counts as that value)."""

    field: str
    value: str  # a Python literal
    why: str

    @property
    def why_literal(self) -> str:
        return repr(self.why)


@dataclass(frozen=True)
class Spec:
    family: str
    architectures: tuple[str, ...]
    config: tuple[ConfigEntry, ...]
    derived: tuple[Derived, ...]
    requires: tuple[Requirement, ...]
    params: tuple[Param, ...]
    megatron: Megatron
    source_name: str
    sha256: str

    @property
    def imports(self) -> list[str]:
        """The `_kinds` names the rendered module uses: shorthands in the order of KINDS,
        then the vocabulary composed families name (stable output)."""
        used = {p.kind.name for p in self.params if p.kind}
        names = [name for name in KINDS if name in used]
        for param in self.params:
            if param.kind is None:
                family = param.family
                classes = ["Part", type(family.megatron_layout).__name__, type(family.vllm_layout).__name__]
                classes += ["Pad"] * any(getattr(layout, "pad", None) for layout in (family.megatron_layout,
                                                                                      family.vllm_layout))
                names += [name for name in dict.fromkeys(classes) if name not in names]
        return names

    @property
    def vllm_layout(self) -> bool:
        """Whether the spec maps to vLLM's fused tensors (every family names one); without
        it engines load full HF tensors with their own loader (the gather method)."""
        return all(p.vllm is not None for p in self.params)

    def hf_field(self, name: str) -> str:
        """How to name a config value in an error a user reads: its HF field."""
        for entry in self.config:
            if entry.name == name:
                return entry.field
        for derived in self.derived:
            if derived.name == name:
                return f"{name} ({derived.expression})"
        raise KeyError(name)


def load_spec(path: str | Path) -> Spec:
    """Read and validate one spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), None, "", f"cannot read spec: {exc.strerror}") from None
    return parse_spec(text, str(path))


def parse_spec(text: str, path: str) -> Spec:
    raw = load_yaml(text, path)
    check = _Checker(path)
    check.mapping(raw, "", TOP_LEVEL)
    family = check.identifier(raw["family"], raw.line_of("family"), "family")
    architectures = check.architectures(raw["architectures"], raw.line_of("architectures"))
    config = check.config(raw["config"], raw.line_of("config"))
    int_names = {e.name for e in config if e.type == "int"}
    bool_names = {e.name for e in config if e.type == "bool"}
    derived = check.derived(raw.get("derived") or LineDict(), raw.line_of("derived"), int_names, bool_names)
    int_names |= {d.name for d in derived}
    requires = check.requires(raw.get("requires") or LineDict(), raw.line_of("requires"))
    params = check.params(raw["params"], raw.line_of("params"), int_names, bool_names)
    if any(p.stage == "layer" for p in params) and "layers" not in int_names:
        check.fail(raw.line_of("config"), "config", "missing 'layers': params with {layer} need the number of layers")
    float_names = {e.name for e in config if e.type == "float"}
    megatron = check.megatron(raw["megatron"], raw.line_of("megatron"), params, float_names, int_names, bool_names)
    return Spec(
        family=family,
        architectures=architectures,
        config=config,
        derived=derived,
        requires=requires,
        params=params,
        megatron=megatron,
        source_name=Path(path).name,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
    )


class _Checker:
    """Validation helpers that all raise SpecError for one file."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, line: int | None, where: str, message: str):
        raise SpecError(self.path, line, where, message)

    def mapping(self, value, where: str, fields: dict[str, bool], line: int | None = None) -> LineDict:
        if not isinstance(value, dict):
            self.fail(line, where, f"expected a mapping, got {_describe(value)}")
        for key in value:
            if key not in fields:
                expected = ", ".join(fields)
                self.fail(value.line_of(key), _join(where, key), f"unknown field; expected one of: {expected}")
        for key, required in fields.items():
            if required and key not in value:
                self.fail(value.line, where or "spec", f"missing required field '{key}'")
        return value

    def identifier(self, value, line: int, where: str) -> str:
        if not isinstance(value, str) or not _IDENTIFIER.match(value) or keyword.iskeyword(value):
            self.fail(line, where, f"expected an identifier (letters, digits, _), got {_describe(value)}")
        return value

    def architectures(self, value, line: int) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            self.fail(line, "architectures", f"expected a non-empty list of HF architecture names, got {_describe(value)}")
        for i, name in enumerate(value):
            self.identifier(name, value.line_of(i), f"architectures[{i}]")
        return tuple(value)

    def config(self, value, line: int) -> tuple[ConfigEntry, ...]:
        if not isinstance(value, dict) or not value:
            self.fail(line, "config", f"expected a mapping of names to HF config fields, got {_describe(value)}")
        entries: list[ConfigEntry] = []
        for name, item in value.items():
            where, item_line = f"config.{name}", value.line_of(name)
            self.name(name, item_line, where, {e.name for e in entries})
            if isinstance(item, str):
                item = {"field": item}
            elif isinstance(item, dict):
                self.mapping(item, where, CONFIG_FIELDS, item_line)
            else:
                self.fail(item_line, where, f"expected an HF field name or {{field, type, default}}, got {_describe(item)}")
            field = self.identifier(item["field"], item_line, f"{where}.field")
            kind = item.get("type", "int")
            if kind not in CONFIG_TYPES:
                self.fail(item_line, f"{where}.type", f"expected 'int', 'bool' or 'float', got {_describe(kind)}")
            default = item.get("default")
            if default is not None:
                default = self.default(default, kind, item_line, where, {e.name for e in entries if e.type == "int"})
            entries.append(ConfigEntry(name, field, kind, default))
        return tuple(entries)

    def default(self, value, kind: str, line: int, where: str, int_names: set[str]) -> str:
        if kind == "bool":
            if not isinstance(value, bool):
                self.fail(line, f"{where}.default", f"expected true or false, got {_describe(value)}")
            return repr(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                hint = " (YAML reads 1e-6 as a string: write 1.0e-6)" if isinstance(value, str) else ""
                self.fail(line, f"{where}.default", f"expected a positive number, got {_describe(value)}{hint}")
            return repr(float(value))
        if isinstance(value, bool):
            self.fail(line, f"{where}.default", "expected an integer expression, got a boolean")
        try:
            return int_expression(value, int_names)
        except ExpressionError as exc:
            self.fail(line, f"{where}.default", str(exc))

    def requires(self, value, line: int) -> tuple[Requirement, ...]:
        if not isinstance(value, dict):
            self.fail(line, "requires", f"expected a mapping of HF field to {{value, why}}, got {_describe(value)}")
        result = []
        for field, item in value.items():
            where = f"requires.{field}"
            item_line = value.line_of(field)
            if not isinstance(field, str) or not field:
                self.fail(item_line, "requires", f"expected an HF field name, got {_describe(field)}")
            self.mapping(item, where, REQUIREMENT_FIELDS, item_line)
            literal = item["value"]
            if not _is_json_literal(literal):
                self.fail(item_line, f"{where}.value", f"expected a number, boolean, string or list of them, "
                                                      f"got {_describe(literal)}")
            if not isinstance(item["why"], str) or not item["why"].strip():
                self.fail(item_line, f"{where}.why", "expected a sentence saying why other values are refused")
            result.append(Requirement(field, repr(_plain(literal)), item["why"].strip()))
        return tuple(result)

    def derived(self, value, line: int, int_names: set[str], bool_names: set[str]) -> tuple[Derived, ...]:
        if not isinstance(value, dict):
            self.fail(line, "derived", f"expected a mapping of names to expressions, got {_describe(value)}")
        result: list[Derived] = []
        for name, text in value.items():
            item_line = value.line_of(name)
            self.name(name, item_line, f"derived.{name}", int_names | bool_names | {d.name for d in result})
            try:
                int_expression(text, int_names | {d.name for d in result})
            except ExpressionError as exc:
                self.fail(item_line, f"derived.{name}", str(exc))
            result.append(Derived(name, str(text)))
        return tuple(result)

    def megatron(self, value, line: int, params: tuple[Param, ...], float_names: set[str], int_names: set[str],
                 bool_names: set[str]) -> Megatron:
        self.mapping(value, "megatron", SECTION, line)
        normalization = value["normalization"]
        if normalization not in NORMALIZATIONS:
            self.fail(value.line_of("normalization"), "megatron.normalization",
                      f"expected one of: {', '.join(NORMALIZATIONS)}, got {_describe(normalization)}")
        for field in ("layernorm_epsilon", "rotary_base"):
            if value[field] not in float_names:
                known = ", ".join(sorted(float_names)) or "none"
                self.fail(value.line_of(field), f"megatron.{field}",
                          f"expected a float config name ({known}), got {_describe(value[field])}")
        missing = missing_families(params)
        if missing:
            self.fail(line, "megatron", f"a megatron-core GPTModel is sized by families the spec lacks or lays out otherwise: {', '.join(missing)}")
        has_experts = any(p.family.experts for p in params)
        for field in MOE_FIELDS:
            if (field in value) != has_experts:
                need = "a spec with experts must say" if has_experts else "only a spec with experts says"
                self.fail(value.line_of(field) if field in value else line, f"megatron.{field}",
                          f"{need} {field} (router_topk: the router's top-k, an integer config name; "
                          f"router_pre_softmax: whether the softmax comes before the top-k, true, false, a "
                          f"boolean config name or 'not NAME')")
        topk = pre_softmax = None
        if has_experts:
            topk = self.size_name(value["router_topk"], value.line_of("router_topk"), "megatron.router_topk", int_names)
            pre_softmax = value["router_pre_softmax"]
            if not isinstance(pre_softmax, bool):
                try:
                    flag, negated = condition(pre_softmax, bool_names)
                except ExpressionError as exc:
                    self.fail(value.line_of("router_pre_softmax"), "megatron.router_pre_softmax",
                              f"true, false, or {exc}")
                pre_softmax = f"{'not ' if negated else ''}cfg.{flag}"
        return megatron_facts(params, normalization, value["layernorm_epsilon"], value["rotary_base"], topk, pre_softmax)

    def name(self, name: str, line: int, where: str, taken: set[str]):
        self.identifier(name, line, where)
        if name in RESERVED:
            self.fail(line, where, f"'{name}' is reserved; pick another name")
        if name in taken:
            self.fail(line, where, f"'{name}' is already defined")

    def params(self, value, line: int, int_names: set[str], bool_names: set[str]) -> tuple[Param, ...]:
        if not isinstance(value, dict) or not value:
            self.fail(line, "params", f"expected a mapping of parameter families, got {_describe(value)}")
        params = [self.param(key, item, value.line_of(key), int_names, bool_names) for key, item in value.items()]
        named = [key for param, key in zip(params, value) if param.vllm is not None]
        if named and len(named) < len(params):
            # half a table would plan some tensors and silently leave the rest to no one
            missing = next(key for param, key in zip(params, value) if param.vllm is None)
            self.fail(value.line_of(missing), f"params.{missing}.vllm",
                      f"missing, but params.{named[0]} has one: give every family a vllm name, or none "
                      f"(engines then load full HF tensors with their own loader)")
        for side in ("megatron", "vllm", "hf"):
            seen: dict[str, str] = {}
            for param, key in zip(params, value):
                if side == "hf":
                    names = list(dict.fromkeys(name for _, name in param.hf))
                else:
                    names = [param.megatron] if side == "megatron" else list(param.vllm or ())
                for name in names:
                    if name in seen:
                        self.fail(value.line_of(key), f"params.{key}.{side}", f"'{name}' is also the {side} name of params.{seen[name]}")
                    seen[name] = key
        return tuple(params)

    def param(self, key: str, item, line: int, int_names: set[str], bool_names: set[str]) -> Param:
        where = f"params.{key}"
        self.identifier(key, line, where)
        self.mapping(item, where, PARAM_FIELDS, line)
        shorthand = "split" in item
        wrong = [f for f in (COMPOSED_FIELDS if shorthand else SHORTHAND_FIELDS) if f in item]
        if wrong:
            form = "a shorthand (split, dims)" if shorthand else "a composed layout (layout, shape or parts, cols)"
            self.fail(item.line_of(wrong[0]), f"{where}.{wrong[0]}", f"not with {form}: a family is one or the other")
        experts = None
        if "experts" in item:
            experts = self.size_name(item["experts"], item.line_of("experts"), f"{where}.experts", int_names)
        megatron = self.pattern(item["megatron"], item.line_of("megatron"), f"{where}.megatron",
                                expert=experts is not None)
        layered = "{layer}" in megatron
        stage = "layer" if layered else ("first" if megatron.startswith("embedding.") else "last")
        if "stage" in item:
            if layered or item["stage"] not in STAGES:
                expected = "no stage: a layer's stage follows its layer" if layered else "'first' or 'last'"
                self.fail(item.line_of("stage"), f"{where}.stage", f"expected {expected}, got {_describe(item['stage'])}")
            stage = item["stage"]
        when = None
        if "when" in item:
            try:
                when = condition(item["when"], bool_names)
            except ExpressionError as exc:
                self.fail(item.line_of("when"), f"{where}.when", str(exc))
        if shorthand:
            kind_name = item["split"]
            if kind_name not in KINDS:
                self.fail(item.line_of("split"), f"{where}.split", f"unknown split kind {_describe(kind_name)}; expected one of: {', '.join(KINDS)}")
            kind = KINDS[kind_name]
            if "dims" not in item:
                self.fail(line, where, f"missing required field 'dims' (split '{kind.name}' is sized by "
                                       f"{', '.join(kind.required_dims)})")
            roles = kind.hf_roles or ("",)
            dims = self.dims(item["dims"], item.line_of("dims"), f"{where}.dims", kind, int_names)
        else:
            kind, dims = None, ()
            if "layout" not in item:
                self.fail(line, where, "missing required field 'split' (a shorthand) or 'layout' (a composed layout)")
            parts, cols = self.parts(item, line, where, int_names)
            roles = tuple(role for role, _, _ in parts)
        hf = self.hf_names(item["hf"], item.line_of("hf"), f"{where}.hf", roles, layered, experts is not None)
        vllm = self.vllm_names(item, f"{where}.vllm", roles, layered) if "vllm" in item else None
        if experts is not None and vllm is not None and len(vllm) > 1:
            self.fail(item.line_of("vllm"), f"{where}.vllm", "an expert family stacks its experts in one vLLM tensor: "
                                                              "give one name")
        hf_of = dict(hf)
        if kind is not None:
            if experts is not None and kind.name not in EXPERT_SHORTHANDS:
                self.fail(item.line_of("experts"), f"{where}.experts",
                          f"split '{kind.name}' has no expert axis; expected one of: {', '.join(EXPERT_SHORTHANDS)}")
            arguments = dict(dims) | ({"experts": experts} if experts else {})
            family = _kinds.SHORTHANDS[kind.name](megatron=megatron, hf=[name for _, name in hf], vllm=vllm,
                                                  stage=stage, **arguments)
        else:
            layouts = self.layouts(item["layout"], item.line_of("layout"), f"{where}.layout", roles, 1 + len(cols),
                                   vllm, int_names)
            family = _kinds.Family(
                megatron=megatron,
                parts=tuple(_kinds.Part(role, hf_of[role], count, unit) for role, count, unit in parts),
                megatron_layout=layouts["megatron"], vllm_layout=layouts["vllm"], vllm=vllm, stage=stage,
                cols=cols, experts=experts)
        return Param(key, when, family, kind, dims)

    def parts(self, item, line: int, where: str, int_names: set[str]
              ) -> tuple[tuple[tuple[str, str, str | None], ...], tuple[str, ...]]:
        """(role, count, unit) per part, and the names sizing the other dimensions."""
        if ("shape" in item) == ("parts" in item):
            self.fail(line, where, "a composed layout gives 'shape' (one tensor) or 'parts' (several), one of them")
        if "shape" in item:
            if "cols" in item:
                self.fail(item.line_of("cols"), f"{where}.cols", "not with shape: its entries after the first are the columns")
            shape = item["shape"]
            if not isinstance(shape, list) or not shape:
                self.fail(item.line_of("shape"), f"{where}.shape", f"expected a list of integer config names, got {_describe(shape)}")
            names = tuple(self.size_name(name, shape.line_of(i), f"{where}.shape[{i}]", int_names) for i, name in enumerate(shape))
            return (("", names[0], None),), names[1:]
        value = item["parts"]
        if not isinstance(value, dict) or not value:
            self.fail(item.line_of("parts"), f"{where}.parts", f"expected a mapping of part names to sizes, got {_describe(value)}")
        parts = []
        for role, size in value.items():
            part_where, part_line = f"{where}.parts.{role}", value.line_of(role)
            self.identifier(role, part_line, part_where)
            if not isinstance(size, dict):
                size = {"count": size}
            else:
                self.mapping(size, part_where, PART_FIELDS, part_line)
            count = self.size_name(size["count"], part_line, f"{part_where}.count", int_names)
            unit = self.size_name(size["unit"], part_line, f"{part_where}.unit", int_names) if "unit" in size else None
            parts.append((role, count, unit))
        cols = item.get("cols", [])
        if not isinstance(cols, list):
            self.fail(item.line_of("cols"), f"{where}.cols", f"expected a list of integer config names, got {_describe(cols)}")
        cols = tuple(self.size_name(name, cols.line_of(i), f"{where}.cols[{i}]", int_names) for i, name in enumerate(cols))
        return tuple(parts), cols

    def layouts(self, value, line: int, where: str, roles: tuple[str, ...], dims: int,
                vllm: tuple[str, ...] | None, int_names: set[str]) -> dict[str, _kinds.Layout]:
        per_side = value if isinstance(value, dict) and set(value) == set(SIDES) else {side: value for side in SIDES}
        result = {}
        for side in SIDES:
            # a vLLM tensor per part places each part alone
            alone = side == "vllm" and vllm is not None and len(vllm) > 1
            side_where = f"{where}.{side}" if per_side is value else where
            side_line = value.line_of(side) if per_side is value else line
            try:
                result[side] = placement(per_side[side], side, roles, dims, int_names, alone)
            except LayoutError as exc:
                self.fail(side_line, side_where, str(exc))
        return result

    def size_name(self, name, line: int, where: str, int_names: set[str]) -> str:
        if name not in int_names:
            known = ", ".join(sorted(int_names))
            self.fail(line, where, f"expected an integer config or derived name ({known}), got {_describe(name)}")
        return name

    def pattern(self, value, line: int, where: str, layered: bool | None = None, expert: bool = False) -> str:
        """A tensor name; {layer} as in the megatron name (`layered`), {expert} exactly when
        the family has an expert axis and the side names a tensor per expert (`expert`)."""
        if not isinstance(value, str) or not _TENSOR_NAME.match(value):
            self.fail(line, where, f"expected a dotted tensor name whose placeholders are {{layer}} and {{expert}}, "
                                   f"got {_describe(value)}")
        if layered is not None and layered != ("{layer}" in value):
            need = "must contain {layer}, as the megatron name does" if layered else "must not contain {layer}: the megatron name has none"
            self.fail(line, where, need)
        if expert != ("{expert}" in value):
            need = ("must contain {expert}: the family has experts, one tensor each" if expert else
                    "must not contain {expert}: only an expert family's megatron and hf names do (vLLM stacks experts)")
            self.fail(line, where, need)
        return value

    def hf_names(self, value, line: int, where: str, roles: tuple[str, ...], layered: bool, expert: bool
                 ) -> tuple[tuple[str, str], ...]:
        """One HF name per part: a name (one part), a name per part, or {fused: NAME}: one HF
        tensor whose rows are the parts in order."""
        if roles == ("",):
            if not isinstance(value, str):
                self.fail(line, where, f"one part maps to one HF tensor: expected a name, got {_describe(value)}")
            return (("", self.pattern(value, line, where, layered, expert)),)
        if isinstance(value, dict) and set(value) == {FUSED}:
            fused = self.pattern(value[FUSED], value.line_of(FUSED), f"{where}.{FUSED}", layered, expert)
            return tuple((role, fused) for role in roles)
        if not isinstance(value, dict):
            self.fail(line, where, f"expected a mapping of {', '.join(roles)} to HF names, or {{{FUSED}: NAME}} "
                                   f"for one HF tensor holding them in that order, got {_describe(value)}")
        self.mapping(value, where, {role: True for role in roles}, line)
        named: dict[str, str] = {}
        for role in roles:
            name = self.pattern(value[role], value.line_of(role), f"{where}.{role}", layered, expert)
            if name in named:
                self.fail(value.line_of(role), f"{where}.{role}",
                          f"'{name}' is also {where}.{named[name]}: one HF tensor holding several parts is written "
                          f"{{{FUSED}: NAME}} (its rows are the parts in order: {', '.join(roles)})")
            named[name] = role
        return tuple((role, value[role]) for role in roles)

    def vllm_names(self, item, where: str, roles: tuple[str, ...], layered: bool) -> tuple[str, ...]:
        """One vLLM tensor (every part, as the vllm layout places them) or one per part."""
        value, line = item["vllm"], item.line_of("vllm")
        if isinstance(value, str) or roles == ("",):
            return (self.pattern(value, line, where, layered),)
        if not isinstance(value, dict):
            self.fail(line, where, f"expected a vLLM name, or a mapping of {', '.join(roles)} to one each, got {_describe(value)}")
        self.mapping(value, where, {role: True for role in roles}, line)
        return tuple(self.pattern(value[role], value.line_of(role), f"{where}.{role}", layered) for role in roles)

    def dims(self, value, line: int, where: str, kind: Kind, int_names: set[str]) -> tuple[tuple[str, str], ...]:
        fields = {d: True for d in kind.required_dims} | {d: False for d in kind.optional_dims}
        self.mapping(value, where, fields, line)
        for dim, name in value.items():
            self.size_name(name, value.line_of(dim), f"{where}.{dim}", int_names)
        return tuple((dim, value[dim]) for dim in fields if dim in value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)


def _is_json_literal(value) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, (bool, int, float, str)) for v in value)
    return isinstance(value, (bool, int, float, str))


def _plain(value):
    """YAML's list type (with line numbers) as a plain list, for a clean repr."""
    return list(value) if isinstance(value, list) else value
