"""Gadget settings: the reconstruction config plus how images are sent back.

One mapping from ``name -> text`` serves every front end: Gadgetron chain properties,
the server's config names and JSON parameters, and the command line.
"""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unrollinr.config import SECTIONS, ReconConfig, parse_setting

GADGET_FIELDS = ("output", "device", "series_index", "uint16_scale")
OUTPUT_TYPES = ("uint16", "float", "complex")


@dataclass(frozen=True)
class GadgetSettings:
    """``recon`` settings, the image ``output`` type, torch ``device``, ``series_index`` and
    ``uint16_scale``: the factor from magnitude to ``uint16`` pixels, the same for every
    stream (``None``: each stream fixes its own on its first image; see
    :class:`~unrollinr_gadget.images.ImageFactory`)."""

    recon: ReconConfig = field(default_factory=ReconConfig)
    output: str = "uint16"
    device: str | None = None
    series_index: int = 1
    uint16_scale: float | None = None

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"output must be one of {OUTPUT_TYPES}, got {self.output!r}")
        if self.series_index < 0:
            raise ValueError(f"series_index must not be negative, got {self.series_index}")
        if self.uint16_scale is not None and not (math.isfinite(self.uint16_scale) and self.uint16_scale > 0):
            raise ValueError(f"uint16_scale must be a positive number, got {self.uint16_scale}")

    @classmethod
    def from_properties(cls, properties: Mapping[str, Any], *, base: GadgetSettings | None = None) -> GadgetSettings:
        """Settings from ``name -> value`` pairs: gadget fields plus any :class:`ReconConfig`
        field (and ``preset``). Unknown names and bad values raise ``ValueError``."""
        base = base or cls()
        values = dict(properties)
        gadget = {name: values.pop(name) for name in GADGET_FIELDS if name in values}
        recon = ReconConfig.from_strings(values, base=base.recon) if values else base.recon
        if "series_index" in gadget:
            gadget["series_index"] = parse_setting("series_index", gadget["series_index"], int)
        if "uint16_scale" in gadget:
            gadget["uint16_scale"] = parse_setting("uint16_scale", gadget["uint16_scale"], float, automatic=True)
        if "device" in gadget:
            gadget["device"] = str(gadget["device"]) or None
            if gadget["device"] == "auto":
                gadget["device"] = None
        return dataclasses.replace(base, recon=recon, **gadget)

    @classmethod
    def known_names(cls) -> set[str]:
        """Every property name that :meth:`from_properties` accepts."""
        dotted = {f"{section}.{name}" for section, names in SECTIONS.items() for name in names}
        return set(GADGET_FIELDS) | {f.name for f in dataclasses.fields(ReconConfig)} | dotted | {"preset"}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def gadget_configuration(chain: ElementTree.Element) -> ElementTree.Element:
    """Our ``<configuration>`` within a whole chain: that of its ``<external>`` node. An
    element that holds no ``<external>`` is taken to be the gadget's configuration itself."""
    externals = [e for e in chain.iter() if _local(e.tag) == "external"]
    if not externals:
        return chain
    if len(externals) > 1:
        ours = [e for e in externals for x in e if _local(x.tag) == "execute"
                and (x.get("name") or "").startswith("unrollinr_gadget")]
        externals = ours or externals
    for child in externals[0]:
        if _local(child.tag) == "configuration":
            return child
    return ElementTree.Element("configuration")


def chain_properties(element: ElementTree.Element | None) -> dict[str, str]:
    """The ``<property name=... value=.../>`` pairs of a gadget ``<configuration>``."""
    if element is None:
        return {}
    properties: dict[str, str] = {}
    for prop in element.iter():
        if _local(prop.tag) != "property":
            continue
        name, value = prop.get("name"), prop.get("value")
        if name is None or value is None:  # Gadgetron 3 style: <property><name/><value/></property>
            name = _child_text(prop, "name")
            value = _child_text(prop, "value")
        if name is None:
            raise ValueError("a <property> without a name")
        properties[name] = value if value is not None else ""
    return properties


def _child_text(element: ElementTree.Element, tag: str) -> str | None:
    for child in element:
        if _local(child.tag) == tag:
            return (child.text or "").strip()
    return None
