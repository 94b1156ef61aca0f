-- Every status report updates its worker's registration. Without an index on expires_at
-- (the expiry sweep reads the small table whole) and with room left in each page, those
-- updates are HOT: no index is touched.
DROP INDEX worker_registrations_expires_at;
ALTER TABLE worker_registrations SET (fillfactor = 50);
