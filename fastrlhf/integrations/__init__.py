"""Drop-in adapters for the trainers people already run: verl, OpenRLHF, TRL.

Each adapter module offers the trainer's own loss functions under their own names and signatures,
computed by fastrlhf ops, plus ``patch()`` / ``unpatch()`` that swap them into the installed
package (defining modules, every module that imported them by name, the registries the trainer
looks them up in)::

    import fastrlhf.integrations.verl as fv; fv.patch()        # verl 0.9.x
    import fastrlhf.integrations.openrlhf as fo; fo.patch()    # OpenRLHF 0.11.x
    import fastrlhf.integrations.trl as ft; ft.patch()         # TRL 1.16.x (GRPOTrainer)

Call ``patch()`` before the trainer (and, for the Ray-based verl / OpenRLHF, every worker process)
is built.  Importing an adapter never imports its trainer package; ``patch()`` raises ImportError
when the package is missing and warns with :class:`UntestedVersionWarning` on a version the
adapter was not tested with.
"""

from .patching import UntestedVersionWarning

__all__ = ["UntestedVersionWarning"]
