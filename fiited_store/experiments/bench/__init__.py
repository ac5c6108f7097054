"""The benchmark suites behind ``fiited-store bench``: :mod:`.cpu` (the default), :mod:`.tiers`
(``--suite tiers``) and :mod:`.distributed` (``--suite distributed``)."""
