"""Other members of the Flamingo family, expressed as configuration of `flamingo.model.flamingo.Flamingo`
(see each module's mapping table)."""
