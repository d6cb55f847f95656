"""The candidate registry on a compacted topic: ``store`` (read, write, add/retire/reset), ``follow``
(the workers' view), ``reload`` (hot reload), ``events`` (candidate_events), ``cli``."""
