//! The generation engine's pieces that every front end (the `generate` command, batch files, and
//! next the server) shares: planning jobs and grouping them into pipeline requests, and reading the
//! pictures image-to-image starts from. Running a group
//! and writing its images still live in `commands::generate`.

pub(crate) mod init;
pub(crate) mod plan;
