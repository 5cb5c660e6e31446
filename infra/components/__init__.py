"""One ``pulumi.ComponentResource`` per logical piece of the architecture; see each module's docstring."""
