//! Image-to-image inputs of a run: the pictures a group's [`InitSpec`] names, read once (consecutive
//! groups of a batch usually share them) and turned into the pipeline's [`Init`], with the record
//! the metadata keeps of them (paths, SHA-256, strength).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::Result;
use crate::metadata::InitRecord;
use crate::options::InitSpec;
use crate::picture::{self, LoadedPicture};
use crate::pipeline::Init;

/// Pictures read so far (the last few, by path).
#[derive(Default)]
pub(crate) struct Pictures {
    cache: RefCell<Vec<(PathBuf, Rc<LoadedPicture>)>>,
}

/// How many pictures [`Pictures`] keeps.
const CACHED: usize = 4;

impl Pictures {
    fn load(&self, what: &str, path: &Path) -> Result<Rc<LoadedPicture>> {
        if let Some((_, p)) = self.cache.borrow().iter().find(|(k, _)| k == path) {
            return Ok(p.clone());
        }
        let p = Rc::new(picture::load(what, path)?);
        if p.had_alpha {
            crate::term::note(&format!(
                "{what} {}: its alpha channel is ignored (as Pillow's convert(\"RGB\"))",
                path.display()
            ));
        }
        let mut cache = self.cache.borrow_mut();
        if cache.len() == CACHED {
            cache.remove(0);
        }
        cache.push((path.to_path_buf(), p.clone()));
        Ok(p)
    }

    /// The pipeline's input for `spec` and its record; an unreadable picture is a usage error
    /// naming the flag and the file.
    pub(crate) fn init(&self, spec: &InitSpec) -> Result<(Init, InitRecord)> {
        let image = self.load("--init-image", &spec.image)?;
        let mask = spec
            .mask
            .as_deref()
            .map(|m| self.load("--mask", m).map(|p| (m, p)))
            .transpose()?;
        let record = InitRecord {
            image: spec.image.display().to_string(),
            image_sha256: image.sha256.clone(),
            mask: mask.as_ref().map(|(m, _)| m.display().to_string()),
            mask_sha256: mask.as_ref().map(|(_, p)| p.sha256.clone()),
            strength: spec.strength,
        };
        let init = Init {
            image: image.picture.clone(),
            mask: mask.map(|(_, p)| p.picture.clone()),
            strength: spec.strength,
        };
        Ok((init, record))
    }
}
