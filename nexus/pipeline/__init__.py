"""The end-to-end job (``nexus run``): collect -> select -> convert -> train -> evaluate -> plot."""
