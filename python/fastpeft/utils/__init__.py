"""peft's `peft.utils` import paths for the fastpeft features that live there (currently `hotswap`)."""
