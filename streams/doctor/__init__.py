"""``shadowlens doctor`` and the start-up checks: ``checks`` (models, topics, ports, database),
``traffic`` (a sample of real records through the replay core), ``registry``."""
