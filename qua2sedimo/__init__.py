"""The ``qua2sedimo`` command line and demo: the front door above both halves (multiquant, autobuild)."""
