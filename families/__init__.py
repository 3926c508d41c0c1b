"""First-party NEXUS family plugins, each registered through the ``nexus`` entry-point group."""
