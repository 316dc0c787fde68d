//! Which of a project's built images an agent removes. Pure.

/// A built image of a project on an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Its tag (`localhost/tributary/<tenant>/<project>:<key>`).
    pub tag: String,
    pub key: String,
    pub id: String,
    /// When it was built, µs since the epoch.
    pub created: i64,
    pub bytes: u64,
}

/// The images beyond the newest `keep` keys (newest by build time, then by key), never the
/// image of `current` (the key a job is about to run in). `keep == 0` keeps everything.
pub fn beyond_newest(images: &[LocalImage], keep: usize, current: &str) -> Vec<LocalImage> {
    if keep == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<&LocalImage> = images.iter().collect();
    sorted.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then_with(|| b.key.cmp(&a.key))
            .then_with(|| a.tag.cmp(&b.tag))
    });
    let mut kept: Vec<&str> = vec![current];
    let mut out = Vec::new();
    for image in sorted {
        if kept.contains(&image.key.as_str()) {
            continue;
        }
        if kept.len() < keep {
            kept.push(&image.key);
        } else {
            out.push(image.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(key: &str, created: i64) -> LocalImage {
        LocalImage {
            tag: format!("localhost/tributary/t/p:{key}"),
            key: key.into(),
            id: format!("sha256:{key}"),
            created,
            bytes: 10,
        }
    }

    fn keys(images: &[LocalImage]) -> Vec<&str> {
        images.iter().map(|i| i.key.as_str()).collect()
    }

    #[test]
    fn the_oldest_beyond_the_limit_go() {
        let images = [image("a", 1), image("b", 2), image("c", 3), image("d", 4)];
        assert_eq!(keys(&beyond_newest(&images, 2, "d")), ["b", "a"]);
        assert_eq!(keys(&beyond_newest(&images, 5, "d")), Vec::<&str>::new());
        assert_eq!(keys(&beyond_newest(&images, 0, "d")), Vec::<&str>::new());
        // The current key stays even when older ones are newer than it.
        assert_eq!(keys(&beyond_newest(&images, 2, "a")), ["c", "b"]);
        assert_eq!(keys(&beyond_newest(&images, 1, "x")), ["d", "c", "b", "a"]);
    }

    proptest! {
        #[test]
        fn keeps_exactly_the_newest(created in proptest::collection::vec(0i64..20, 0..12), keep in 1usize..6) {
            let images: Vec<LocalImage> = created.iter().enumerate().map(|(i, c)| image(&format!("k{i:02}"), *c)).collect();
            let current = "k00";
            let pruned = beyond_newest(&images, keep, current);
            let left: Vec<&LocalImage> = images.iter().filter(|i| !pruned.contains(i)).collect();
            prop_assert!(!pruned.iter().any(|i| i.key == current));
            prop_assert_eq!(left.len(), images.len().min(keep));
            // Every pruned image is older than (or as old as) every kept one but the current.
            for p in &pruned {
                for l in left.iter().filter(|l| l.key != current) {
                    prop_assert!(p.created <= l.created);
                }
            }
        }
    }
}
