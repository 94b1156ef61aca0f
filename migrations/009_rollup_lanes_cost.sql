-- rollup_group_lanes (008) decodes one worker's lanes of a rollup block: some 0.1 to 0.5 ms
-- of PL/pgSQL a call, which PostgreSQL estimated as a plain function's (COST 100, 1,000 rows).
-- So a one-worker read of the rollup views (Grafana's worker detail) was often planned to
-- decode every worker's lanes of each block and only then join stat_workers to keep the one
-- asked for: 70 to 200 ms where 2 to 10 suffice. Declared at about its cost (in units of
-- cpu_operator_cost) and its rows (a lane per variant: a few), the planner keeps the block's
-- worker asked for before decoding. Fleet-wide reads decode every lane either way.
ALTER FUNCTION rollup_group_lanes(bytea, boolean) COST 100000 ROWS 4;

-- With that cost a fleet-wide read's plan passes jit_above_cost, and PostgreSQL would compile
-- it at every run (50 to 150 ms measured on these reads, more than they take). The server's
-- own connections already turn JIT off; this does it for every session of the database
-- (Grafana's, psql's), where the migrating role may.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'jit left as it is: only the owner of the database may set it (ALTER DATABASE ... SET jit = off)';
END $$;
