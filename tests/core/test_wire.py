"""Every name of QEMU's wire format is written once, in qfram/wire.py; the C loops get
theirs from qfram/includes/wire.pxd, which setup.py generates from it: the compiled values
agree, and nothing else spells them."""
from __future__ import annotations

import re
from pathlib import Path

from qfram import _fast, wire

ROOT = Path(__file__).resolve().parents[2]


def test_the_c_loops_use_the_values_of_wire_py():
    c_values = _fast._c_wire()
    assert len(c_values) >= 15
    for name, value in c_values.items():
        assert getattr(wire, name) == value, name


def test_no_other_module_defines_a_wire_constant():
    defining = re.compile(r"^(RAM_SAVE_FLAG_\w+|FLAG_\w+|SECTION_\w+|CMD_\w+|MIG_RP_MSG_\w+|"
                          r"QEVM_MAGIC|PREEMPT_MAGIC|RAM_SECTION_ID|TARGET_PAGE_SIZE)\s*=",
                          re.M)
    offenders = []
    for path in (ROOT / "qfram").rglob("*.py*"):
        if path.name in ("wire.py", "wire.pxd") or path.suffix not in (".py", ".pyx", ".pxd",
                                                                          ".pxi"):
            continue
        for m in defining.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not offenders


def test_flag_names_spell_a_record():
    assert wire.flag_names(wire.RAM_SAVE_FLAG_CONTINUE | wire.RAM_SAVE_FLAG_PAGE) == \
        "PAGE|CONTINUE"
    assert wire.flag_names(0x1000) == "0x1000"
