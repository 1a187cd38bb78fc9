//! The generation engine's pieces that every front end (the `generate` command, batch files, and
//! next the server) shares: planning jobs and grouping them into pipeline requests. Running a group
//! and writing its images still live in `commands::generate`.

pub(crate) mod plan;
