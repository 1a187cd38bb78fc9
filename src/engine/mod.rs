//! The generation engine that every front end (the `generate` command, batch files and `serve`)
//! drives: planning jobs and grouping them into pipeline requests (`plan`), the pictures
//! image-to-image starts from (`init`), and a loaded model that generates a group and gives back
//! its images with their metadata (`session`). Front ends add only their own I/O: files and
//! names for `generate`, HTTP for `serve`.

pub(crate) mod init;
pub(crate) mod plan;
pub(crate) mod session;
