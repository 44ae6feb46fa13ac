"""Every benchmark of the pack (``loom bench ...``): ``library`` (index and search), ``compose`` / ``gates`` /
``clora`` (each method against its baseline), ``perf`` (every method and the peers' approaches side by side, read
against the FLOP limit from :mod:`.flops`), ``patching`` (the merged patch step, Loom vs core), ``quality``
(composition quality on the playground) and ``soak`` (server memory under load, with :mod:`.comfy_server`, the
ComfyUI server process the tests start too). :mod:`.library`, :mod:`.flops`, :mod:`.report` and :mod:`.plot` are
pure; :mod:`.perf`, :mod:`.baselines`, :mod:`.compose`, :mod:`.gates`, :mod:`.clora`, :mod:`.patching` and
:mod:`.quality` import ComfyUI."""
