"""Operations: submission to a Ray cluster (Ray Jobs) and cron schedules of generate jobs."""
