"""The option dataclasses of the commands, and the ``str`` Enums their choices use.

A leaf below every other layer, importing no torch, numpy or scipy at module level: a command's
``--help`` builds its signature from these dataclasses alone (:mod:`flatcli.cli.options`). What
needs torch (a device, a dtype) is imported inside the method that needs it. The modules that
compute with a config re-export it (``flatcli.measures.spectrum.SpectrumConfig`` is
:class:`flatcli.configs.spectrum.SpectrumConfig`).
"""
