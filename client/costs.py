"""Cost files for VMs in virtual time, as `vmmu calibrate` writes them.

    vm = client.create_vm(clock="virtual", costs=load_cost_file("host-costs.json"))

A cost file is a JSON object of cost names to ns, or an object holding one under "costs"
(beside what was measured); its format is defined once, in `vmmu.cost_file`. The names and
values are the server's to check: a VM created with an unknown name or a value out of
range is InvalidArgument, with the names it knows.
"""

from __future__ import annotations

from vmmu.cost_file import read_cost_file as load_cost_file

__all__ = ["load_cost_file"]
